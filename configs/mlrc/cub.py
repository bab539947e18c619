"""CUB-200-2011 under "A Metric Learning Reality Check" (configs/mlrc/protocol.py): the HPL paper's Table 3.

Data: TFDS `caltech_birds2011` (see configs/cub.py); classes 1-100 are cut into 4 folds of 25 (fold p validates
on classes 25p+1..25p+25 and trains on the other 75), classes 101-200 are the test set. BN-Inception weights:
`python -m hpl_jax.convert_weights --arch bn_inception ...` (docs/datasets.md, "ImageNet-pretrained weights").

The 4 folds one after another on one GPU host, then the tables:
  python -m hpl_jax.mlrc run --config=configs/mlrc/cub.py --workdir=/data/runs/mlrc_cub \
      --config.dataset.data_dir=$HOME/tensorflow_datasets --config.model.pretrained=weights/bn_inception
  python -m hpl_jax.mlrc_report /data/runs/mlrc_cub
On 4 hosts (or an array job), line p + 1 of the printed commands on host p:
  python -m hpl_jax.mlrc run --config=configs/mlrc/cub.py --workdir=/shared/mlrc_cub --run=print ...
Flat Proxy-Anchor, the table's baseline: add --config.hpl.weights='(1.0,)'.

Validation every 2 epochs of 100 iterations, early stopping after 9 epochs without a better validation MAP@R.
Expected runtime (estimate, not measured): a few hundred epochs of 100 steps of 32 images per fold, under an
hour per fold on one A100-class GPU.
Compare with (docs/method.md, concatenated 512-d, P@1 / R-Precision / MAP@R): Proxy-Anchor 67.64 / 37.29 / 26.47,
HPL on Proxy-Anchor 68.25 / 37.57 / 26.72.
"""
from configs.mlrc import protocol


def get_config():
    config = protocol.get_config()
    config.dataset.name = "cub"
    # K_1 = 8 as configs/cub.py: the 75 training species of a fold in coarse groups of about 9.
    config.hpl.num_coarse = (8,)
    config.eval.every_epochs = 2
    config.eval.early_stopping_patience = 9
    return config

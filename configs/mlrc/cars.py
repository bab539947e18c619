"""Cars196 under "A Metric Learning Reality Check" (configs/mlrc/protocol.py): the HPL paper's Table 2.

Data: TFDS `cars196` from a manual directory (see configs/cars.py); classes 1-98 are cut into 4 folds of 24 or
25 (blocks start at floor(98 p / 4): 1-24, 25-49, 50-73, 74-98), classes 99-196 are the test set. BN-Inception
weights: `python -m hpl_jax.convert_weights --arch bn_inception ...` (docs/datasets.md, "ImageNet-pretrained weights").

The 4 folds one after another on one GPU host, then the tables:
  python -m hpl_jax.mlrc run --config=configs/mlrc/cars.py --workdir=/data/runs/mlrc_cars \
      --config.dataset.manual_dir=/data/cars196_files --config.model.pretrained=weights/bn_inception
  python -m hpl_jax.mlrc_report /data/runs/mlrc_cars
On 4 hosts (or an array job): add --run=print and run line p + 1 on host p.
Flat Proxy-Anchor, the table's baseline: add --config.hpl.weights='(1.0,)'.

Validation every 5 epochs of 100 iterations, early stopping after 14 epochs without a better validation MAP@R.
Expected runtime (estimate, not measured): about an hour per fold on one A100-class GPU.
Compare with (docs/method.md, concatenated 512-d, P@1 / R-Precision / MAP@R): Proxy-Anchor 86.38 / 37.53 / 27.77,
HPL on Proxy-Anchor 86.84 / 38.36 / 28.67.
"""
from configs.mlrc import protocol


def get_config():
    config = protocol.get_config()
    config.dataset.name = "cars"
    # K_1 = 14 as configs/cars.py (the makes of the training models).
    config.hpl.num_coarse = (14,)
    config.eval.every_epochs = 5
    config.eval.early_stopping_patience = 14
    return config

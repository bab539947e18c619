"""Stanford Online Products under "A Metric Learning Reality Check" (configs/mlrc/protocol.py): the HPL paper's
Table 1.

Data: TFDS `stanford_online_products` (see configs/sop.py); its 11,318 training products are cut into 4 folds
of about 2,830 (by product id), its 11,316 test products are the test set. BN-Inception weights:
`python -m hpl_jax.convert_weights --arch bn_inception ...` (docs/datasets.md, "ImageNet-pretrained weights").

The 4 folds one after another on one GPU host, then the tables:
  python -m hpl_jax.mlrc run --config=configs/mlrc/sop.py --workdir=/data/runs/mlrc_sop \
      --config.dataset.data_dir=$HOME/tensorflow_datasets --config.model.pretrained=weights/bn_inception
  python -m hpl_jax.mlrc_report /data/runs/mlrc_sop
On 4 hosts (or an array job): add --run=print and run line p + 1 on host p.
Flat Proxy-Anchor, the table's baseline: add --config.hpl.weights='(1.0,)'.

Validation every 20 epochs of 100 iterations, early stopping after 39 epochs without a better validation MAP@R.
Every evaluation also embeds the 60,502 test images (logged, never used for selection).
Expected runtime (estimate, not measured): several hours per fold on one A100-class GPU.
Compare with (docs/method.md, concatenated 512-d, P@1 / R-Precision / MAP@R): Proxy-Anchor 76.12 / 50.82 / 47.88,
HPL on Proxy-Anchor 76.97 / 51.97 / 49.07.
"""
from configs.mlrc import protocol


def get_config():
    config = protocol.get_config()
    config.dataset.name = "sop"
    # K_1 = 512 and one k-means restart per refresh, as configs/sop.py.
    config.hpl.num_coarse = (512,)
    config.hpl.kmeans_restarts = 1
    config.eval.every_epochs = 20
    config.eval.early_stopping_patience = 39
    config.eval.recall_at = (1, 10, 100, 1000)
    config.eval.super_metrics = False
    return config

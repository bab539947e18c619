"""CUB-200-2011: HPL on Proxy-Anchor, ResNet-50, 512-d, the public Proxy-Anchor recipe for CUB (docs/method.md).

Data: TFDS `caltech_birds2011` (TFDS downloads 1.2 GB from data.caltech.edu on first use), its train and test
splits combined; classes 1-100 train (5,864 images), classes 101-200 are the test set (5,924 images),
self-retrieval, Recall@1,2,4,8 plus P@1 / R-Precision / MAP@R / NMI. ImageNet weights are needed for the
published numbers: convert them with `python -m hpl_jax.convert_weights` and pass --config.model.pretrained.

GPU host (all its GPUs, one process):
  python -m hpl_jax.main --config=configs/cub.py --workdir=/tmp/hpl_cub \
      --config.dataset.data_dir=$HOME/tensorflow_datasets --config.model.pretrained=/path/to/resnet50
  (or launch/gpu_host.sh with the same flags)
TPU pod (e.g. v4-16, 8 chips on 2 hosts: 120 = 15 images per chip; prepare the data once first with
`tfds build caltech_birds2011 --data_dir=gs://BUCKET/tensorflow_datasets`):
  launch/tpu_pod.sh --config=configs/cub.py --workdir=gs://BUCKET/hpl_cub \
      --config.dataset.data_dir=gs://BUCKET/tensorflow_datasets --config.model.pretrained=gs://BUCKET/resnet50
Flat Proxy-Anchor, the baseline: add --config.hpl.weights='(1.0,)'.

Expected runtime (estimate, not measured): 60 epochs of 48 steps, about 20-30 minutes on one A100-class GPU fed
by 8 or more CPU cores (python -m hpl_jax.benchmarks.input_pipeline tells how many cores one GPU needs).
Compare with: Proxy-Anchor's official code, ResNet-50 512-d, CUB Recall@1 69.9 (docs/method.md); HPL's own table
(BN-Inception, docs/method.md "Published numbers") gives P@1 / R-Precision / MAP@R 68.25 / 37.57 / 26.72.
"""
from configs import imagenet_recipe


def get_config():
    config = imagenet_recipe.get_config()
    config.dataset.name = "cub"

    # K_1 = 8: the 100 training species then form coarse groups of about 12 (CUB has no given hierarchy; the
    # paper's per-dataset K_1 is not recoverable here, docs/method.md).
    config.hpl.num_coarse = (8,)
    return config

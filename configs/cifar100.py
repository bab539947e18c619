"""CIFAR-100 split by class: the smallest real-data download (TFDS, 160 MB), not a published benchmark.

Data: TFDS `cifar100`, its train and test splits combined; fine classes 0-49 train (30,000 images), 50-99 are
the test set (30,000 images), self-retrieval, Recall@1,2,4,8 plus P@1 / R-Precision / MAP@R / NMI;
super-class: `coarse_label`. Not a published metric-learning benchmark: the model and recipe are CUB's
(ResNet-50 at 224 x 224, the 32 x 32 images upsampled), so the numbers only show the pipeline working.

GPU host (all its GPUs, one process):
  python -m hpl_jax.main --config=configs/cifar100.py --workdir=/tmp/hpl_cifar100 \
      --config.model.pretrained=/path/to/resnet50
  (or launch/gpu_host.sh with the same flags)
/path/to/resnet50: torchvision's ImageNet weights, converted once with
  python -m hpl_jax.convert_weights --arch resnet50 --input resnet50-0676ba61.pth --output /path/to/resnet50
(docs/datasets.md, "ImageNet-pretrained weights"); the recipe fine-tunes them.
TPU pod (e.g. v4-16, 8 chips on 2 hosts; prepare once first with
`tfds build cifar100 --data_dir=gs://BUCKET/tensorflow_datasets`):
  launch/tpu_pod.sh --config=configs/cifar100.py --workdir=gs://BUCKET/hpl_cifar100 \
      --config.dataset.data_dir=gs://BUCKET/tensorflow_datasets --config.model.pretrained=gs://BUCKET/resnet50
Faster look on one GPU: --config.num_epochs=10 --config.dataset.image_size=112 --config.dataset.resize_size=128.

Expected runtime (estimate, not measured): 60 epochs of 250 steps, about 2 hours on one A100-class GPU.
Compare with: no published number; flat Proxy-Anchor (--config.hpl.weights='(1.0,)') is the comparison.
"""
from configs import imagenet_recipe


def get_config():
    config = imagenet_recipe.get_config()
    config.dataset.name = "cifar100"

    # K_1 = 19: the 50 training classes fall into 19 of the 20 coarse labels (no flower class trains), so
    # k-means and the ground-truth ablation (hpl.ground_truth_level1) use as many coarse proxies.
    config.hpl.num_coarse = (19,)
    return config

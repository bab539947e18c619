"""Cars196: HPL on Proxy-Anchor, ResNet-50, 512-d, the public Proxy-Anchor recipe for Cars (docs/method.md).

Data: TFDS `cars196`, its train and test splits combined; classes 1-98 train (8,054 images), classes 99-196 are
the test set (8,131 images), self-retrieval, Recall@1,2,4,8 plus P@1 / R-Precision / MAP@R / NMI. Super-class
of each model: its make (hpl_jax/data/cars_makes.py). TFDS's download address for Cars196 is dead: get
cars_train.tgz, cars_test.tgz, cars_test_annos_withlabels.mat and car_devkit.tgz from a mirror into a folder and
pass it as --config.dataset.manual_dir (TFDS checks them against its checksums and prepares the dataset).

GPU host (all its GPUs, one process):
  python -m hpl_jax.main --config=configs/cars.py --workdir=/tmp/hpl_cars \
      --config.dataset.manual_dir=/data/cars196_files --config.model.pretrained=/path/to/resnet50
  (or launch/gpu_host.sh with the same flags)
/path/to/resnet50: torchvision's ImageNet weights, converted once with
  python -m hpl_jax.convert_weights --arch resnet50 --input resnet50-0676ba61.pth --output /path/to/resnet50
(docs/datasets.md, "ImageNet-pretrained weights"); the recipe fine-tunes them.
TPU pod (e.g. v4-16, 8 chips on 2 hosts; prepare once first with
`tfds build cars196 --data_dir=gs://BUCKET/tensorflow_datasets --manual_dir=/data/cars196_files`):
  launch/tpu_pod.sh --config=configs/cars.py --workdir=gs://BUCKET/hpl_cars \
      --config.dataset.data_dir=gs://BUCKET/tensorflow_datasets --config.model.pretrained=gs://BUCKET/resnet50
Flat Proxy-Anchor, the baseline: add --config.hpl.weights='(1.0,)'.

Expected runtime (estimate, not measured): 60 epochs of 67 steps, about 30-40 minutes on one A100-class GPU fed
by 8 or more CPU cores.
Compare with: Proxy-Anchor's official code, ResNet-50 512-d, Cars Recall@1 87.7 (docs/method.md); HPL's own table
(BN-Inception, docs/method.md "Published numbers") gives P@1 / R-Precision / MAP@R 86.84 / 38.36 / 28.67.
"""
from configs import imagenet_recipe


def get_config():
    config = imagenet_recipe.get_config()
    config.dataset.name = "cars"

    # K_1 = 14: the 98 training models come from 14 makes, so k-means can find the make level and the
    # ground-truth ablation (hpl.ground_truth_level1) has as many coarse proxies.
    config.hpl.num_coarse = (14,)

    config.optim.decay_epochs = 10
    return config

"""Your own images: ROOT/<class>/<images>, HPL on Proxy-Anchor with the CUB recipe (ResNet-50, 512-d).

Data: --config.dataset.data_dir=ROOT, one folder of images (.jpg .jpeg .png .bmp .gif) per class. Optional:
ROOT/train_classes.txt and/or ROOT/test_classes.txt (one class name a line; a missing one is the rest);
otherwise the sorted classes' first half (rounded up) trains and the rest is the unseen test set, evaluated by
self-retrieval, Recall@1,2,4,8 plus P@1 / R-Precision / MAP@R / NMI. Optional ROOT/hierarchy.csv with rows
`class,super_class` gives the ground-truth super-classes (hierarchical metrics, hpl.ground_truth_level1).

GPU host (all its GPUs, one process):
  python -m hpl_jax.main --config=configs/image_folder.py --workdir=/tmp/hpl_mine \
      --config.dataset.data_dir=/data/my_images --config.model.pretrained=/path/to/resnet50
  (or launch/gpu_host.sh with the same flags)
/path/to/resnet50: torchvision's ImageNet weights, converted once with
  python -m hpl_jax.convert_weights --arch resnet50 --input resnet50-0676ba61.pth --output /path/to/resnet50
(docs/datasets.md, "ImageNet-pretrained weights"); the recipe fine-tunes them.
TPU pod (every host must see ROOT, e.g. on GCS):
  launch/tpu_pod.sh --config=configs/image_folder.py --workdir=gs://BUCKET/hpl_mine \
      --config.dataset.data_dir=gs://BUCKET/my_images --config.model.pretrained=gs://BUCKET/resnet50
Set K_1 to about a tenth of your training classes: --config.hpl.num_coarse='(K,)'.

Expected runtime: that of CUB (configs/cub.py) scaled by your number of images.
Compare with: flat Proxy-Anchor on the same folder, --config.hpl.weights='(1.0,)'.
"""
from configs import imagenet_recipe


def get_config():
    config = imagenet_recipe.get_config()
    config.dataset.name = "image_folder"

    # K_1 = 8 as for CUB's 100 training classes; scale it with yours.
    config.hpl.num_coarse = (8,)
    return config

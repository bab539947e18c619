"""Cars196 with ViT-S/16: HPL on Proxy-Anchor, 384-d, HIER's ViT recipe (configs/vit_recipe.py) on configs/cars.py.

Data as configs/cars.py (its files placed by hand in --config.dataset.manual_dir). Weights: timm's
`vit_small_patch16_224.augreg_in21k_ft_in1k`, converted once:
  python -m hpl_jax.convert_weights --arch vit_small --input model.safetensors --preprocessing inception \
      --output /path/to/vit_small_augreg

GPU host (all its GPUs, one process):
  python -m hpl_jax.main --config=configs/vit_cars.py --workdir=/tmp/hpl_vit_cars \
      --config.dataset.manual_dir=/data/cars196_files --config.model.pretrained=/path/to/vit_small_augreg
Flat Proxy-Anchor, the baseline: add --config.hpl.weights='(1.0,)'.

Expected runtime (estimate, not measured): 100 epochs of 44 steps of 180 images at 224 px, about 30-40 minutes on
one A100-class GPU fed by 8 or more CPU cores.
Compare with (Recall@1, ViT-S/16, 384-d, as issue 32 quotes them): HIER (Kim et al., CVPR 2023) 88.3; Hyp-ViT
(Ermolov et al., CVPR 2022) 86.5; with ResNet-50 at 512-d HIER reports 88.2.
"""
from configs import cars
from configs import vit_recipe


def get_config():
    return vit_recipe.with_vit_recipe(cars.get_config())

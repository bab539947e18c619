"""CUB-200-2011 with ViT-S/16: HPL on Proxy-Anchor, 384-d, HIER's ViT recipe (configs/vit_recipe.py) on configs/cub.py.

Data as configs/cub.py. Weights: timm's `vit_small_patch16_224.augreg_in21k_ft_in1k` (model.safetensors from its
Hugging Face page), converted once:
  python -m hpl_jax.convert_weights --arch vit_small --input model.safetensors --preprocessing inception \
      --output /path/to/vit_small_augreg

GPU host (all its GPUs, one process):
  python -m hpl_jax.main --config=configs/vit_cub.py --workdir=/tmp/hpl_vit_cub \
      --config.dataset.data_dir=$HOME/tensorflow_datasets --config.model.pretrained=/path/to/vit_small_augreg
Flat Proxy-Anchor, the baseline: add --config.hpl.weights='(1.0,)'.

Expected runtime (estimate, not measured): 100 epochs of 32 steps of 180 images at 224 px, about 20-30 minutes on
one A100-class GPU fed by 8 or more CPU cores.
Compare with (Recall@1, ViT-S/16, 384-d, as issue 32 quotes them): HIER (Kim et al., CVPR 2023) 85.7; Hyp-ViT
(Ermolov et al., CVPR 2022) 85.6; with ResNet-50 at 512-d HIER reports 70.1.
"""
from configs import cub
from configs import vit_recipe


def get_config():
    return vit_recipe.with_vit_recipe(cub.get_config())

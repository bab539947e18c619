"""In-Shop Clothes Retrieval with ViT-S/16: HPL on Proxy-Anchor, 384-d, HIER's ViT recipe for In-Shop
(configs/vit_recipe.py: 150 epochs, weight decay 1e-4, 5 warm-up epochs, the embedding layer at 100 x lr) on
configs/inshop.py.

Data as configs/inshop.py (the official files in --config.dataset.manual_dir). Weights: timm's
`vit_small_patch16_224.augreg_in21k_ft_in1k`, converted once:
  python -m hpl_jax.convert_weights --arch vit_small --input model.safetensors --preprocessing inception \
      --output /path/to/vit_small_augreg

GPU host (all its GPUs, one process):
  python -m hpl_jax.main --config=configs/vit_inshop.py --workdir=/tmp/hpl_vit_inshop \
      --config.dataset.manual_dir=/data/inshop --config.model.pretrained=/path/to/vit_small_augreg
Flat Proxy-Anchor, the baseline: add --config.hpl.weights='(1.0,)'.

Expected runtime (estimate, not measured): 150 epochs of 143 steps of 180 images at 224 px, about 2-3 hours on one
A100-class GPU fed by 16 CPU cores.
Compare with (Recall@1, ViT-S/16, 384-d, as issue 32 quotes them): HIER (Kim et al., CVPR 2023) 92.8; Hyp-ViT
(Ermolov et al., CVPR 2022) 92.5; with ResNet-50 at 512-d HIER reports 92.4.
"""
from configs import inshop
from configs import vit_recipe


def get_config():
    return vit_recipe.with_large_dataset_schedule(vit_recipe.with_vit_recipe(inshop.get_config()))

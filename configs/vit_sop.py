"""Stanford Online Products with ViT-S/16: HPL on Proxy-Anchor, 384-d, HIER's ViT recipe for SOP
(configs/vit_recipe.py: 150 epochs, weight decay 1e-4, 5 warm-up epochs, the embedding layer at 100 x lr) on
configs/sop.py.

Data as configs/sop.py. Weights: timm's `vit_small_patch16_224.augreg_in21k_ft_in1k`, converted once:
  python -m hpl_jax.convert_weights --arch vit_small --input model.safetensors --preprocessing inception \
      --output /path/to/vit_small_augreg

GPU host (all its GPUs, one process):
  python -m hpl_jax.main --config=configs/vit_sop.py --workdir=/tmp/hpl_vit_sop \
      --config.dataset.data_dir=$HOME/tensorflow_datasets --config.model.pretrained=/path/to/vit_small_augreg
Flat Proxy-Anchor, the baseline: add --config.hpl.weights='(1.0,)'.

Expected runtime (estimate, not measured): 150 epochs of 330 steps of 180 images at 224 px, evaluated every 5th
epoch (HIER's --eval_freq 5), about 4-6 hours on one A100-class GPU fed by 16 CPU cores.
Compare with (Recall@1, ViT-S/16, 384-d, as issue 32 quotes them): HIER (Kim et al., CVPR 2023) 86.1; Hyp-ViT
(Ermolov et al., CVPR 2022) 85.9; with ResNet-50 at 512-d HIER reports 80.2.
"""
from configs import sop
from configs import vit_recipe


def get_config():
    config = vit_recipe.with_large_dataset_schedule(vit_recipe.with_vit_recipe(sop.get_config()))
    config.eval.every_epochs = 5
    return config

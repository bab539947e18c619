"""Fine-tuning a pretrained backbone on the embedded SOP-like data, with the Proxy-Anchor recipe (the paper's regime).

The backbone and the recipe are configs/finetune_default.py's (pretrained on hpl_jax/data/synthetic_source.py by
configs/pretrain_synthetic.py; frozen BN, a warm-up epoch of the head and the proxies, lr 1e-4, proxies at 100x):
  python -m hpl_jax.main --config=configs/finetune_synthetic_sop.py --workdir=/tmp/hpl_ft_sop
Flat Proxy-Anchor from the same backbone: add --config.hpl.weights='(1.0,)'.

10 epochs, the length of the from-scratch study's comparisons on these data (docs/study.md), so the two regimes
compare at equal training; every run still picks its epoch on the validation classes.
"""
from configs import finetune_default
from configs import synthetic_sop


def get_config():
    config = finetune_default.finetune_recipe(synthetic_sop.get_config())
    config.num_epochs = 10
    return config

"""Fine-tuning a pretrained backbone on the embedded default data, with the Proxy-Anchor recipe (the paper's regime).

The pretrained backbone: `python -m hpl_jax.main --config=configs/pretrain_synthetic.py --workdir=/tmp/hpl_pretrain`
writes /tmp/hpl_pretrain/backbone (a disjoint, larger source of the same visual domain: hpl_jax/data/synthetic_source.py),
the path this config reads unless --config.model.pretrained names another. Then:
  python -m hpl_jax.main --config=configs/finetune_default.py --workdir=/tmp/hpl_ft_default
Flat Proxy-Anchor from the same backbone: add --config.hpl.weights='(1.0,)'.

The recipe (`finetune_recipe`, also configs/finetune_synthetic_sop.py's) is the published Proxy-Anchor fine-tuning
of an ImageNet backbone (docs/method.md), fixed before any fine-tuning run was read: BatchNorm frozen at the
pretrained statistics, a first epoch that trains only the embedding layer and the proxies, AdamW at lr 1e-4 with
the proxies at 100x, weight decay 1e-4; everything else is configs/default.py's (12 epochs, lr halved every 5).
Results against training from scratch, and HPL against Proxy-Anchor in this regime: docs/study.md.
"""
from configs import default

PRETRAINED = "/tmp/hpl_pretrain/backbone"


def finetune_recipe(config):
    """The Proxy-Anchor fine-tuning recipe on top of a target's config (returns it)."""
    config.model.pretrained = PRETRAINED
    config.model.bn_frozen = True
    config.optim.lr = 1e-4
    config.optim.lr_mults = (("proxies/.*", 100.0),)
    config.optim.weight_decay = 1e-4
    config.optim.warmup_epochs = 1
    config.optim.warmup_trainable = ("model/embedding/.*", "proxies/.*")
    return config


def get_config():
    return finetune_recipe(default.get_config())

"""Pretraining on the embedded source: a backbone for the embedded targets, as ImageNet is for CUB (no download).

Data: `hpl_jax/data/synthetic_source.py`, 6 draws of the SOP-like generator and 6 of the default one at data seeds
1000-1005 (none a target's: the study's targets use data seeds 0-2), 36 x 36 cropped to 32 x 32: 6,000 training
classes, 35,696 training photos; its test split (the draws' unseen classes) is evaluated as retrieval, the
pretraining's own check. Task: classification of the training classes by a normalised softmax (Proxy-NCA with the
positive in the denominator, T = 0.1: a softmax over cosine / 0.05, Zhai & Wu 2019; hpl_jax/trainer/pretraining.py), the
whole network training from epoch 0 with BatchNorm in train mode, as an ImageNet classifier does. The backbone is
the targets' (ResNet-18 at width 0.25, configs/default.py), so its weights fit them.

Run (no download; the last state's backbone goes to WORKDIR/backbone):
  python -m hpl_jax.main --config=configs/pretrain_synthetic.py --workdir=/tmp/hpl_pretrain
Fine-tune from it with the Proxy-Anchor recipe (frozen BN, a warm-up of the head and the proxies, lr 1e-4, proxies
at 100x): configs/finetune_synthetic_sop.py (SOP-like data) or configs/finetune_default.py (default data), e.g.
  python -m hpl_jax.main --config=configs/finetune_synthetic_sop.py --workdir=/tmp/hpl_ft_sop \
    --config.model.pretrained=/tmp/hpl_pretrain/backbone
This recipe was fixed before any fine-tuning run was read. The pretraining's wall time and its test metrics:
docs/training.md, "Pretraining a backbone here"; what fine-tuning from it gives: docs/study.md, "From pretrained
features".
"""
from configs import default


def get_config():
    config = default.get_config()
    config.dataset.name = "synthetic_source"
    # No validation classes: nothing is chosen on the source; the last epoch's backbone is exported.
    config.dataset.num_val_classes = 0
    # A flat classifier: one proxy (class weight) per training class, no coarse level.
    config.hpl.weights = (1.0,)
    config.loss.base = "proxy_nca"
    config.loss.temperature = 0.1
    config.loss.exclude_positive = False
    # Everything trains from the first step (no warm-up); BatchNorm in train mode (default.py's bn_frozen False).
    config.optim.warmup_epochs = 0
    config.batch_size = 128
    config.num_epochs = 12
    config.optim.decay_epochs = 4
    # The source's test split (about 36,000 photos of 6,000 unseen classes) every 4 epochs; NMI (k-means into 6,000
    # clusters) and the super-class metrics cost more than they tell here.
    config.eval.every_epochs = 4
    config.eval.batch_size = 512
    config.eval.recall_at = (1, 10, 100)
    config.eval.nmi = False
    config.eval.super_metrics = False
    config.checkpoint.best_metric = ""
    config.log_every_steps = 50
    config.export_backbone = True
    return config

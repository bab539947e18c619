"""The MLRC protocol (configs/mlrc/protocol.py) on the embedded dataset, scaled down to a CPU: a demo of the
4-fold path end to end, not a benchmark.

  python -m hpl_jax.mlrc run --config=configs/mlrc/synthetic.py --workdir=/tmp/mlrc_synthetic
  python -m hpl_jax.mlrc_report /tmp/mlrc_synthetic

The embedded data (configs/default.py: 8 families x 10 classes x 30 images, half of each family's classes test)
has 40 training classes, numbered family by family, so each of the 4 folds validates on the 10 classes of two
families and trains on the other 30; the 40 test classes are the same for every fold. As the protocol: 128-d,
global average pooling, batch 32, RMSprop with momentum 0.9 and weight decay 1e-4 (proxies at 100x), no warm-up,
clipping or decay, validation MAP@R every 2 epochs, early stopping after 9 epochs without improvement, the best
validation checkpoint of each fold reported. Scaled down: a ResNet-18 of width 0.25 from random init at 32 x 32
(so BatchNorm trains, and the learning rate is 1e-3, not 1e-6), 10 iterations per epoch, at most 40 epochs;
plain shuffled batches (the embedded dataset has no class-balanced sampler).
Expected: see docs/reproducing.md (runtime and table measured on a 2-core CPU).
"""
from configs import default
from configs.mlrc import protocol


def get_config():
    config = protocol.get_config()
    embedded = default.get_config()
    config.dataset = embedded.dataset
    config.dataset.num_folds = 4
    config.dataset.num_val_classes = 0

    config.model.backbone = "resnet18"
    config.model.width = 0.25
    config.model.bn_frozen = False

    config.optim.lr = 1e-3
    config.steps_per_epoch = 10
    config.num_epochs = 40
    config.eval.every_epochs = 2
    config.eval.early_stopping_patience = 9
    config.eval.batch_size = 128
    config.log_every_steps = 10
    return config

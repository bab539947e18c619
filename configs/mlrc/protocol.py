"""The protocol of "A Metric Learning Reality Check" (Musgrave et al., ECCV 2020; docs/method.md), under which the HPL
paper's Tables 1-3 were made: the base of configs/mlrc/{cub,cars,sop}.py (each sets its dataset and its
validation interval and patience). Not run on its own: it names no dataset. Every field is documented in
configs/default.py.

As powerful-benchmarker (branch metric-learning) sets it up:
- the test set is the second half of the classes (each dataset's usual split); the first half is cut into 4
  contiguous blocks of the sorted classes, and fold p trains on 3 blocks and validates on block p
  (dataset.num_folds, dataset.val_fold; data.fold_split); `python -m hpl_jax.mlrc run` trains the 4 folds;
- per fold: ImageNet BN-Inception with frozen BatchNorm statistics, global average pooling, a linear layer to
  128-d; batches of 32 = 8 classes x 4 images; train crop: random resized crop 227 with scale (0.16, 1) and
  flip; eval: resize 256, centre crop 227; BGR in 0..255 minus (104, 117, 128);
- RMSprop (PyTorch's) lr 1e-6, momentum 0.9, weight decay 1e-4 for trunk and embedder, no learning-rate decay,
  no gradient clipping, no warm-up; 100 iterations per "epoch", at most 1000 epochs;
- validation MAP@R on the held-out block every eval.every_epochs epochs, early stopping after
  eval.early_stopping_patience epochs without improvement, the best validation checkpoint kept (best/);
- `python -m hpl_jax.mlrc_report ROOT`: test P@1 / R-Precision / MAP@R, separated (each 128-d model, averaged)
  and concatenated (the 4 normalised embeddings, 512-d).

Differences from powerful-benchmarker, all small: the train crop is taken from the image, not from its 256
resize (the same crop up to interpolation, since the crop's scale is relative); the linear embedder starts
from Proxy-Anchor's init (normal, std sqrt(2/d)) rather than PyTorch's Linear default; its validation blocks
differ slightly (data.fold_split); SOP's halves are the dataset's own train/test files (11,318 / 11,316
products) where MLRC halves the sorted product ids.

Unknown (docs/method.md): HPL's own settings under this protocol. MLRC tuned the proxies' optimiser (RMSprop, its
learning rate searched in [1e-6, 1] by Bayesian optimisation) and published no value for Proxy-Anchor, which it
did not benchmark; the proxies here keep the Proxy-Anchor recipe's 100x of the base learning rate (1e-4), and
alpha 32 / delta 0.1. HPL's w = (1.0, 0.1) and K_1 per dataset are as in configs/{cub,cars,sop}.py.
"""
from configs import imagenet_recipe


def get_config():
    config = imagenet_recipe.get_config()

    config.dataset.num_folds = 4
    config.dataset.val_fold = 0
    config.dataset.num_val_classes = 0
    config.dataset.image_size = 227
    config.dataset.resize_size = 256
    config.dataset.crop_scale = (0.16, 1.0)
    # BN-Inception's pixels (model.pretrained's metadata sets them too).
    config.dataset.color_order = "bgr"
    config.dataset.pixel_scale = 255.0
    config.dataset.mean = (104.0, 117.0, 128.0)
    config.dataset.std = (1.0, 1.0, 1.0)
    config.dataset.sampler = "class_balanced"
    config.dataset.samples_per_class = 4

    config.model.backbone = "bn_inception"
    config.model.embedding_dim = 128
    config.model.pooling = "avg"
    config.model.bn_frozen = True
    # MLRC trained in float32; 'bfloat16' is faster on GPUs and TPUs.
    config.model.dtype = "float32"

    config.optim.name = "rmsprop"
    config.optim.lr = 1e-6
    config.optim.momentum = 0.9
    config.optim.weight_decay = 1e-4
    config.optim.lr_mults = (("proxies/.*", 100.0),)
    config.optim.warmup_epochs = 0
    config.optim.grad_clip_value = 0.0
    config.optim.decay_gamma = 1.0

    config.batch_size = 32
    config.steps_per_epoch = 100
    config.num_epochs = 1000
    config.eval.every_epochs = 2
    config.eval.early_stopping_patience = 9
    config.eval.batch_size = 256
    config.eval.nmi = False
    config.checkpoint.best_metric = "map@r"
    return config

"""HIER's published recipes (Kim et al., CVPR 2023; official code github.com/tjddus9597/HIER-CVPR23): HIER on flat
Proxy-Anchor, ResNet-50 or ViT-S/16, on CUB, Cars, SOP or In-Shop. Each field is documented in configs/default.py;
HIER itself in docs/method.md, "HIER, the other hierarchical proxy method".

The argument after the colon names the backbone and the dataset:
  python -m hpl_jax.main --config=configs/hier_recipe.py:resnet50,cub --workdir=/tmp/hier_cub \
      --config.dataset.data_dir=$HOME/tensorflow_datasets --config.model.pretrained=/path/to/resnet50
  python -m hpl_jax.main --config=configs/hier_recipe.py:vit_small,sop --workdir=/tmp/hier_vit_sop \
      --config.dataset.data_dir=$HOME/tensorflow_datasets --config.model.pretrained=/path/to/vit_small
HPL + HIER (HPL's levels regularised by HIER): add --config.hpl.weights='(1.0,0.1)'.
Compare with HIER's Recall@1 (docs/method.md, "Published numbers"): ResNet-50 70.1 / 88.2 / 80.2 / 92.4 and
ViT-S/16 85.7 / 88.3 / 86.1 / 92.8 on CUB / Cars / SOP / In-Shop. Not run here: no real dataset or pretrained
weights can be downloaded on this project's machines.

HIER's own settings, the same in every script of theirs (scripts/{Resnet50,ViT}/hier_*.sh): --lambda2 0.5
(hier.weight), --num_hproxies 512, --hyp_c 0.1, --clip_r 2.3, --mrg 0.1, --topk 20; HIERLoss's tau 0.1
(hier/losses.py). Its proxies train at 50x the base rate and during the warm-up (hier/utils.py get_params_groups:
the 'lcas' group's lr_scale 5e1; hier/train.py zeroes only the 'pretrained_params' group's rate in warm-up).

The ResNet-50 scripts (scripts/Resnet50/hier_{CUB,Cars,SOP,Inshop}.sh) set, per dataset:
  dataset  lr    epochs  weight decay  warm-up  lr x gamma every  BatchNorm
  CUB      1e-4  100     1e-2          1        0.5 / 5 epochs    frozen (--bn_freeze True)
  Cars     1e-4  100     1e-2          1        0.5 / 10 epochs   frozen
  SOP      6e-4  150     1e-4          5        0.3 / 25 epochs   trained (--bn_freeze False)
  In-Shop  6e-4  150     1e-4          5        0.3 / 20 epochs   trained
and in all four: 512-d (--emb 512), batch 180 (--batch_size 90 on 2 GPUs), 2 images per class (--IPC 2,
hier/sampler.py), AdamW (--optimizer adamw), Proxy-Anchor's proxies at 1e4x (hier/utils.py: 'proxies' lr_scale 1e4),
the embedding layer at 1x (--fc_lr_scale 1), gradients clipped element-wise to [-10, 10] (hier/utils.py
clip_gradients_value(model, 10) for any --clip_grad > 0), random resized crops of scale (0.08, 1) at 224 px and
test crops 224 of 256 (hier/utils.py MultiTransforms, hier/train.py --resize_size, --crop_size), mixed precision
(--use_fp16: bfloat16 here), evaluation every 5th epoch on SOP, every epoch elsewhere (--eval_freq). The ViT-S/16 scripts are configs/vit_recipe.py's recipe (each value cited there) with
HIER's settings above.

Where this differs from HIER's code: the ResNet-50 head here is Proxy-Anchor's (average + max pooling, linear
layer), HIER's adds a LayerNorm without affine before the linear layer (--use_lastnorm True) and pools by average
only (its models/resnet.py); the ViT head is HIER's. AdamW's epsilon (1e-4 under fp16 there, optax's 1e-8 here);
during the warm-up the backbone's AdamW moments are not updated here (a learning rate of 0 there). The evaluation
ranks by cosine similarity, which the map into the ball (direction-preserving) leaves as it is.
"""
from configs import cars
from configs import cub
from configs import inshop
from configs import sop
from configs import vit_cars
from configs import vit_cub
from configs import vit_inshop
from configs import vit_sop

# dataset: (lr, epochs, weight decay, warm-up epochs, decay every, gamma, BatchNorm frozen), the ResNet-50 scripts'.
RESNET50_SCHEDULES = {
    "cub": (1e-4, 100, 1e-2, 1, 5, 0.5, True),
    "cars": (1e-4, 100, 1e-2, 1, 10, 0.5, True),
    "sop": (6e-4, 150, 1e-4, 5, 25, 0.3, False),
    "inshop": (6e-4, 150, 1e-4, 5, 20, 0.3, False),
}
DATASET_CONFIGS = {"cub": cub, "cars": cars, "sop": sop, "inshop": inshop}
VIT_CONFIGS = {"cub": vit_cub, "cars": vit_cars, "sop": vit_sop, "inshop": vit_inshop}
BACKBONES = ("resnet50", "vit_small")


def with_hier(config):
    """`config` regularised by HIER with its published settings; its proxies at 50x the base rate, trained in the
    warm-up (the rules go first: the first match wins)."""
    config.hier.weight = 0.5
    config.hier.num_proxies = 512
    config.hier.curvature = 0.1
    config.hier.clip_r = 2.3
    config.hier.margin = 0.1
    config.hier.temperature = 0.1
    config.hier.top_k = 20
    config.optim.lr_mults = (("hier_proxies", 50.0),) + tuple(config.optim.lr_mults)
    config.optim.warmup_trainable = ("hier_proxies",) + tuple(config.optim.warmup_trainable)
    return config


def with_resnet50_recipe(config, dataset: str):
    """`config` (a dataset config) with the optimisation and data of HIER's ResNet-50 script for `dataset`."""
    lr, epochs, weight_decay, warmup, decay_epochs, gamma, bn_frozen = RESNET50_SCHEDULES[dataset]
    config.model.backbone = "resnet50"
    config.model.width = 1.0
    config.model.embedding_dim = 512
    config.model.bn_frozen = bn_frozen
    config.model.dtype = "bfloat16"
    config.dataset.image_size = 224
    config.dataset.resize_size = 256
    config.dataset.crop_scale = (0.08, 1.0)
    config.dataset.sampler = "class_balanced"
    config.dataset.samples_per_class = 2
    config.optim.name = "adamw"
    config.optim.lr = lr
    config.optim.weight_decay = weight_decay
    config.optim.warmup_epochs = warmup
    config.optim.warmup_trainable = ("model/embedding/.*", "proxies/.*")
    config.optim.lr_mults = (("proxies/.*", 1e4),)
    config.optim.frozen = ()
    config.optim.grad_clip_value = 10.0
    config.optim.decay_epochs = decay_epochs
    config.optim.decay_gamma = gamma
    config.batch_size = 180
    config.num_epochs = epochs
    config.eval.every_epochs = 5 if dataset == "sop" else 1  # --eval_freq
    return config


def get_config(argument: str = "resnet50,cub"):
    """argument: 'BACKBONE,DATASET', BACKBONE in BACKBONES, DATASET in cub, cars, sop, inshop."""
    parts = argument.split(",")
    if len(parts) != 2 or parts[0] not in BACKBONES or parts[1] not in DATASET_CONFIGS:
        raise ValueError(f"configs/hier_recipe.py:{argument}: give BACKBONE,DATASET with BACKBONE one of {BACKBONES} "
                         f"and DATASET one of {tuple(DATASET_CONFIGS)}, e.g. configs/hier_recipe.py:resnet50,sop.")
    backbone, dataset = parts
    if backbone == "vit_small":
        config = VIT_CONFIGS[dataset].get_config()
    else:
        config = with_resnet50_recipe(DATASET_CONFIGS[dataset].get_config(), dataset)
    config.hpl.weights = (1.0,)  # HIER on flat Proxy-Anchor, as published
    return with_hier(config)

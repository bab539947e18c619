"""The ViT-S/16 fine-tuning recipe of HIER's official code (tjddus9597/HIER-CVPR23; Kim et al., CVPR 2023), with HPL
on Proxy-Anchor as the loss: the base of configs/vit_{cub,cars,sop,inshop}.py, which apply it to each dataset's
config. Not run on its own: it names no dataset. Each field is documented in configs/default.py.

HIER fine-tunes timm's ImageNet-21k-pretrained ViT-S/16 with Proxy-Anchor (plus its own hyperbolic loss, which HPL's
levels take the place of here). Its values, and the file of HIER's repository that sets each:
- backbone: timm `vit_small_patch16_224`, pretrained (scripts/ViT/hier_*.sh --model; hier/models/model.py
  init_model: timm.create_model(args.model, pretrained=True)), whose weights are
  `timm/vit_small_patch16_224.augreg_in21k_ft_in1k`; images normalised with mean = std = 0.5 (hier/train.py:
  mean_std for models named vit*): convert them with --preprocessing inception (docs/datasets.md).
- features: the class token after the final LayerNorm (hier/train.py --pool 'token', body.reset_classifier(0,
  'token')); the patch projection never trains (hier/models/model.py: freeze(body, 0) freezes patch_embed).
- head: LayerNorm without affine, linear layer (orthogonal init), L2 normalisation (hier/models/model.py; the
  scripts' --use_lastnorm True; hyp_c 0 there is this Euclidean head, the scripts' hyp_c 0.1 maps it into a
  Poincare ball instead, which Proxy-Anchor's cosine does not see).
- crops: train random resized crop 224, scale (0.2, 1), flip; test resize 256, centre crop 224 (hier/utils.py
  MultiTransforms, for models named vit*; hier/train.py --resize_size 256 --crop_size 224).
- sampler: batches of 2 images per class (scripts --IPC 2, hier/sampler.py UniqueClassSampler).
- batch 180: 90 per GPU on 2 GPUs (scripts --batch_size 90, --nproc_per_node=2).
- AdamW, lr 1e-5 (scripts --optimizer adamw --lr 1e-5; hier/train.py scales it by batch / 180 = 1), constant (no
  --lr_decay: hier/train.py's step_scheduler with gamma 1).
- proxies at 1e4 x lr (hier/utils.py get_params_groups: lr_scale 1e4 for the loss's proxies); the embedding layer
  at 1 x lr on CUB and Cars, 100 x on SOP and In-Shop (--fc_lr_scale 1e2 in hier_SOP.sh, hier_Inshop.sh).
- weight decay 1e-2 on CUB and Cars, 1e-4 on SOP and In-Shop (scripts --weight_decay).
- warm-up: the backbone's lr is 0 for 1 epoch on CUB and Cars, 5 on SOP and In-Shop (scripts --warmup_epochs;
  hier/train.py train_one_epoch); the embedding layer and the proxies train.
- gradients clipped element-wise to [-10, 10] (hier/utils.py clip_gradients_value(model, 10), which hier/train.py
  calls for any --clip_grad > 0; the scripts pass 1.0).
- 100 epochs on CUB and Cars, 150 on SOP and In-Shop (scripts --epochs); evaluation every epoch, on SOP every 5th
  (--eval_freq), the best test epoch's Recall@1 reported.
- mixed precision (scripts --use_fp16 True: float16 autocast; bfloat16 here).
- Proxy-Anchor alpha 32, margin 0.1 (hier/losses.py PALoss_Angle), as configs/default.py.
- embedding dimension 384: the published ViT-S rows HIER and Hyp-ViT compare (HIER's Table 1 and Hyp-ViT's, as
  issue 32 quotes them); HIER's scripts pass --emb 128 (CUB, Cars, SOP) and 512 (In-Shop).

Where this differs from HIER's code: the loss (HPL's levels instead of HIER's hyperbolic loss); AdamW's epsilon
(HIER passes 1e-4 under fp16; config.optim has no field for it, optax's 1e-8 is used); in warm-up HIER's AdamW still
updates the backbone's moments with a learning rate of 0, here the backbone's optimiser state is left untouched;
bicubic crops there, the input pipeline's resize here. HIER uses no layer-wise learning-rate decay and no drop-path
(timm's default drop_path_rate 0), so neither is set.
"""
from configs import imagenet_recipe


def with_vit_recipe(config):
    """`config` (a dataset config) with HIER's ViT-S/16 recipe, as its CUB and Cars scripts set it."""
    config.dataset.image_size = 224
    config.dataset.resize_size = 256
    config.dataset.crop_scale = (0.2, 1.0)
    config.dataset.crop_ratio = (3.0 / 4.0, 4.0 / 3.0)
    # timm's augreg ViTs: RGB in [0, 1], then mean = std = 0.5 (model.pretrained's metadata rules).
    config.dataset.mean = (0.5, 0.5, 0.5)
    config.dataset.std = (0.5, 0.5, 0.5)
    config.dataset.color_order = "rgb"
    config.dataset.pixel_scale = 1.0
    config.dataset.sampler = "class_balanced"
    config.dataset.samples_per_class = 2

    config.model.backbone = "vit_small"
    config.model.patch_size = 16
    config.model.width = 1.0
    config.model.pooling = "token"
    config.model.embedding_dim = 384
    config.model.dtype = "bfloat16"

    config.optim.name = "adamw"
    config.optim.lr = 1e-5
    config.optim.weight_decay = 1e-2
    config.optim.lr_mults = (("proxies/.*", 1e4),)
    config.optim.warmup_epochs = 1
    config.optim.warmup_trainable = ("model/embedding/.*", "proxies/.*")
    config.optim.frozen = ("model/backbone/patch_embed/.*",)
    config.optim.grad_clip_value = 10.0
    config.optim.decay_gamma = 1.0

    config.batch_size = 180
    config.num_epochs = 100
    config.eval.batch_size = 480
    config.eval.every_epochs = 1
    return config


def with_large_dataset_schedule(config):
    """`config` with what HIER's SOP and In-Shop scripts change: 150 epochs, weight decay 1e-4, 5 warm-up epochs,
    the embedding layer at 100 x lr."""
    config.num_epochs = 150
    config.optim.weight_decay = 1e-4
    config.optim.warmup_epochs = 5
    config.optim.lr_mults = (("proxies/.*", 1e4), ("model/embedding/.*", 100.0))
    return config


def get_config():
    return with_vit_recipe(imagenet_recipe.get_config())

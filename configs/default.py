"""The embedded default: HPL on Proxy-Anchor, a small ResNet, the procedurally generated dataset.

This file is also the base every dataset config imports and overrides; each field is documented here, and
checked before anything is compiled or read (hpl_jax/trainer/config_checks.py: one checker per section below, the
top-level fields first). The seeds must be integers >= 0 and the True/False fields True or False.

Run (no download, CPU is enough):
  python -m hpl_jax.main --config=configs/default.py --workdir=/tmp/hpl_default
Flat Proxy-Anchor on the same data, for comparison:
  python -m hpl_jax.main --config=configs/default.py --workdir=/tmp/pa_default --config.hpl.weights='(1.0,)'
Expected: see README.md, "What the main run prints" (runtime and Recall@1 measured on a 2-core CPU).
"""
import ml_collections


def get_config():
    config = ml_collections.ConfigDict()
    # Seed of the training run (an integer >= 0): parameter init, data order, augmentation, k-means. (The data
    # themselves and the choice of validation classes follow dataset.seed, so training seeds vary on the same data.)
    config.seed = 0

    config.dataset = dataset = ml_collections.ConfigDict()
    # Which data: 'synthetic' (embedded, no files), 'synthetic_sop' (embedded, SOP-like), 'synthetic_source' (embedded,
    # the pretraining source of configs/pretrain_synthetic.py), 'cub', 'cars', 'sop', 'inshop', 'cifar100',
    # 'image_folder'.
    dataset.name = "synthetic"
    # Seed of the data (an integer >= 0): the embedded dataset's images and which training classes are held out for
    # validation.
    dataset.seed = 0
    # Class-disjoint validation: this many training classes (drawn with dataset.seed) are held out and evaluated
    # each epoch by the test protocol (keys 'val/...'); the best epoch and best/ checkpoint are then chosen on
    # val/<checkpoint.best_metric>, never on test. 0 = no validation (the published recipe selects on test).
    dataset.num_val_classes = 8
    # The class-disjoint folds of "A Metric Learning Reality Check" (configs/mlrc/): the sorted training classes cut
    # into num_folds contiguous blocks, block val_fold (0..num_folds-1) is the validation split and the others
    # train (data.fold_split). 0 = off; with folds, num_val_classes must be 0.
    dataset.num_folds = 0
    dataset.val_fold = 0
    # TFDS data_dir (where prepared TFDS datasets live), or the root of an image folder. '' = TFDS default.
    dataset.data_dir = ""
    # TFDS manual_dir for datasets whose files must be placed by hand (In-Shop, Cars196). '' = TFDS default.
    dataset.manual_dir = ""
    # Side of the square training/test crop fed to the network.
    dataset.image_size = 32
    # Test transform: resize the shorter side to this, then centre-crop image_size (224 * 8 / 7 = 256).
    dataset.resize_size = 36
    # Train transform: random resized crop with this area fraction range and aspect-ratio range, then flip.
    dataset.crop_scale = (0.25, 1.0)
    dataset.crop_ratio = (3.0 / 4.0, 4.0 / 3.0)
    dataset.horizontal_flip = True
    # Per-channel normalisation of [0, 1] RGB pixels (ImageNet statistics).
    dataset.mean = (0.485, 0.456, 0.406)
    dataset.std = (0.229, 0.224, 0.225)
    # Channel order the network expects: 'rgb', or 'bgr' (BN-Inception weights).
    dataset.color_order = "rgb"
    # Pixels are x / 255 * pixel_scale before mean/std: 1 for [0, 1] (ResNets), 255 for [0, 255] (BN-Inception).
    # With model.pretrained, mean, std, color_order and pixel_scale are taken from the weights' metadata.
    dataset.pixel_scale = 1.0
    # 'random' (plain shuffled batches, the Proxy-Anchor recipe) or 'class_balanced' (m images per class).
    dataset.sampler = "random"
    # m for the class-balanced sampler (global batch size must be a multiple of it).
    dataset.samples_per_class = 4
    # tf.data shuffle buffer (TFDS datasets only); the synthetic data shuffles exactly.
    dataset.shuffle_buffer = 16384
    # The decoded cache (TFDS datasets and image folders): each training image a host reads is decoded once, its
    # shorter side resized to cache_shorter_side (larger images only), and kept as u8 in host memory; every epoch,
    # the first included, cuts its random crops and flips from it (same windows, same seeds) and TFDS records are
    # shuffled exactly instead of through shuffle_buffer. A crop is then resampled from the resized image instead
    # of the full-resolution JPEG: a small crop of a large photo has less detail, so the published recipe's images
    # change and the cache is off by default; images no larger than cache_shorter_side (In-Shop's 256 x 256) are
    # cropped exactly as from their files (docs/datasets.md, "The decoded cache"). An image folder's host holds the
    # whole training split, a TFDS host its block; a host whose images exceed cache_max_gb (10^9 bytes) stops with
    # a message before it decodes more.
    dataset.cache_decoded = False
    dataset.cache_shorter_side = 288
    dataset.cache_max_gb = 32.0
    # The embedded dataset: coarse families of fine classes that share visible structure.
    dataset.synthetic = synthetic = ml_collections.ConfigDict()
    synthetic.num_families = 8
    synthetic.classes_per_family = 10  # half of each family trains, the other half is the unseen test set
    synthetic.images_per_class = 30
    # The embedded SOP-like benchmark (dataset.name='synthetic_sop', configs/synthetic_sop.py): super-classes of
    # sub-families of classes (products), few images per class; the design is in hpl_jax/data/synthetic_sop.py.
    dataset.synthetic_sop = synthetic_sop = ml_collections.ConfigDict()
    synthetic_sop.num_super_classes = 12
    synthetic_sop.sub_families_per_super_class = 4
    synthetic_sop.classes_per_sub_family = 40  # the first half of each sub-family trains, the rest is the test set
    # Images per class: (min, max), with P(n + 1) / P(n) = image_count_decay (SOP-like skew; 0.8: mean 5.0).
    synthetic_sop.images_per_class = (2, 12)
    synthetic_sop.image_count_decay = 0.8
    # Which ground-truth level the dataset gives as each class's super-class (super/ metrics, hierarchy metrics,
    # hpl.ground_truth_level1): 'sub_family' (the level above the classes; DatasetInfo.super_parents then maps
    # the sub-families to their super-classes) or 'super_class' (only the top level, as real SOP).
    synthetic_sop.super_level = "sub_family"
    # The embedded pretraining source (dataset.name='synthetic_source', configs/pretrain_synthetic.py): independent
    # draws of the two generators above, with their settings, one per data seed listed; a target drawn with one of
    # these seeds shares the source's classes and is refused for fine-tuning (hpl_jax/data/synthetic_source.py).
    dataset.synthetic_source = synthetic_source = ml_collections.ConfigDict()
    synthetic_source.sop_seeds = (1000, 1001, 1002, 1003, 1004, 1005)  # SOP-like draws
    synthetic_source.default_seeds = (1000, 1001, 1002, 1003, 1004, 1005)  # draws of the default generator

    config.model = model = ml_collections.ConfigDict()
    # 'resnet18', 'resnet34', 'resnet50' (torchvision v1.5 layout), 'bn_inception', or the Vision Transformers
    # 'vit_tiny', 'vit_small', 'vit_base' (timm's vit_{tiny,small,base}_patch16_224 shapes; configs/vit_recipe.py).
    model.backbone = "resnet18"
    # Channel multiplier of the backbone (1.0 = the published widths); small values for CPU runs. A ViT's scales its
    # token channels and MLP and keeps its heads (3, 6, 12), whose count the scaled channels must divide.
    model.width = 0.25
    # d, the embedding dimension (512 in the benchmarks).
    model.embedding_dim = 64
    # Pooling of the backbone's feature map: 'avg_max' (average + max, summed: the official Proxy-Anchor code) or
    # 'avg' (global average pooling: the BN-Inception trunk of "A Metric Learning Reality Check"). A ViT pools its
    # tokens after the final LayerNorm: 'token' (the class token: timm's default, as HIER and Hyp-ViT use it) or
    # 'avg' (the mean of the patch tokens: HIER's --pool avg).
    model.pooling = "avg_max"
    # True: BatchNorm uses fixed running statistics (CUB, Cars); False: train mode, synchronised over devices. (A ViT
    # has no BatchNorm.)
    model.bn_frozen = False
    # Compute dtype of the backbone ('float32' or 'bfloat16'); parameters stay float32.
    model.dtype = "float32"
    # Path of pretrained backbone weights: converted ImageNet weights (python -m hpl_jax.convert_weights), or the
    # backbone/ a run with export_backbone=True wrote (configs/pretrain_synthetic.py); '' = random init. Its
    # metadata.json sets the input normalisation (dataset.mean, std, color_order, pixel_scale) and must name this
    # model.backbone and model.width; weights pretrained on the target's own classes are refused.
    model.pretrained = ""
    # How the backbone's convolutions are computed; the parameters and checkpoints are the same under each, so a
    # run may resume or be evaluated under another. 'auto': XLA's convolution op on GPUs and TPUs (cuDNN, the MXU);
    # on CPUs, per convolution, what was measured fastest there (models.layers.cpu_conv_choice): patches + one
    # matmul (im2col) where the feature map is smaller than the kernel and for 1x1 kernels, oneDNN's convolutions
    # for the 7x7 stem and 3x3 kernels of >= 64 channels, XLA's op elsewhere (and where oneDNN is unavailable:
    # hpl_jax/models/onednn.py builds it on first use from the oneDNN wheels of requirements.txt and a C++
    # compiler, and the run's log says which). 'xla': XLA's op everywhere. 'im2col':
    # patches + matmul everywhere. 'onednn': oneDNN everywhere (CPU only; refused where it is unavailable).
    # Measured in docs/benchmarks.md, section "CPU convolutions" (python -m hpl_jax.benchmarks.cpu_vs_torch). A
    # ViT's one convolution, the patch projection, is always computed as patches times the kernel (one matmul).
    model.conv_impl = "auto"
    # Side in pixels of a ViT's square patches: 16 for the published ViT-*/16, 14 for DINOv2-style weights, small
    # values (e.g. 4) for CPU-sized images; converted weights must have it. The image is cut into
    # dataset.image_size // patch_size patches a side (the remaining pixels left out, as timm's strided convolution
    # does), the grid the position embeddings are learned for (weights learned for another grid are resampled as
    # timm resamples them). Unused by the CNNs.
    model.patch_size = 16

    config.loss = loss = ml_collections.ConfigDict()
    # Base proxy loss applied at every level: 'proxy_anchor' or 'proxy_nca'.
    loss.base = "proxy_anchor"
    # Proxy-Anchor scale alpha and margin delta.
    loss.alpha = 32.0
    loss.delta = 0.1
    # Proxy-NCA softmax temperature T, and whether the positive is left out of the denominator.
    loss.temperature = 1.0 / 32.0
    loss.exclude_positive = False

    config.hpl = hpl = ml_collections.ConfigDict()
    # Chosen on validation for the embedded default data (docs/study.md; 5 seeds a
    # setting): no w_1 in {0, 0.01, 0.03, 0.3, 1.0}, K_1 in {2, 4, 16}, rematch, 4 refreshes an epoch, first
    # grouping from the proxies or ground-truth level 1 beats the values below on val MAP@R with a paired 95%
    # interval above 0, so they stay (the study's rule); nor does HPL beat flat Proxy-Anchor there.
    # w_l per level; its length is the number of levels L + 1. (1.0,) = the flat base loss.
    hpl.weights = (1.0, 0.1)
    # K_l for l = 1..L (decreasing, each smaller than the level below). Only the first len(weights) - 1 used.
    hpl.num_coarse = (8,)
    # What level 1's first grouping clusters: 'class_means' (train embeddings of the initial network)
    # or 'proxies' (the initial fine proxies).
    hpl.first_grouping = "class_means"
    # Refresh the groupings every this many steps; 0 = once per epoch (at each epoch's end).
    hpl.refresh_every_steps = 0
    # At a refresh, coarse proxies are 'reset' to the normalised cluster centres (moments zeroed), or
    # 'rematch': kept, and the new clusters matched to them (Hungarian matching).
    hpl.coarse_policy = "reset"
    # The norm a coarse proxy takes when it is set to a cluster centre: 'children_mean' (the mean norm of the
    # proxies it groups, so it moves at their pace) or 'unit'.
    hpl.coarse_norm = "children_mean"
    # k-means restarts (sklearn n_init) per grouping; each costs a full k-means on the level below.
    hpl.kmeans_restarts = 10
    # Where the groupings' k-means runs, on process 0 only (then broadcast): 'sklearn' (scikit-learn on the host,
    # float64) or 'jax' (hpl_jax.kmeans, jit-compiled, on the default device in float32: k-means++ seeding in
    # rounds, Lloyd, the same empty-cluster repair; its own seeding, so other groupings than 'sklearn' for the
    # same seed; inertia within 0.02 % of scikit-learn's). At SOP scale 'jax' is much the faster even on a CPU, and
    # the devices idle while the host clusters (one restart of each measured in docs/benchmarks.md, section "The
    # hierarchy refresh's k-means"), so the real-dataset configs (configs/imagenet_recipe.py) use 'jax'; the
    # embedded datasets keep 'sklearn', with which their study ran.
    hpl.kmeans_backend = "sklearn"
    # Use the dataset's ground-truth super-classes for level 1 instead of k-means (ablation).
    hpl.ground_truth_level1 = False

    config.hier = hier = ml_collections.ConfigDict()
    # HIER (Kim et al., CVPR 2023; docs/method.md, "HIER, the other hierarchical proxy method"): hierarchical proxies
    # in a Poincare ball regularise the loss above, L = L_HPL + weight * L_HIER, where the embeddings are mapped into
    # the ball first (hpl_jax/core/hier.py: hier_regularised_loss). HIER on flat Proxy-Anchor: hpl.weights=(1.0,).
    # weight: lambda (the official --lambda2); 0 = off (no HIER proxies in the state).
    hier.weight = 0.0
    # P, the number of hierarchical proxies (--num_hproxies); they train at the rate of optim.lr_mults' rule for
    # 'hier_proxies', which a run with HIER must have (configs/hier_recipe.py sets HIER's).
    hier.num_proxies = 512
    # c, the ball's curvature -c (--hyp_c; 0 = the official sphere mode), and the feature clipping radius (--clip_r).
    hier.curvature = 0.1
    hier.clip_r = 2.3
    # The triplet loss's margin (--mrg), the Gumbel-softmax temperature of the LCA choice (HIERLoss's tau), and the
    # reciprocal neighbourhood of the mining (--topk; a row counts in its own). 50 triplets per anchor, as official.
    hier.margin = 0.1
    hier.temperature = 0.1
    hier.top_k = 30

    config.optim = optim = ml_collections.ConfigDict()
    # 'adamw' (decoupled weight decay: the Proxy-Anchor recipe) or 'rmsprop' (PyTorch's RMSprop: alpha 0.99,
    # eps 1e-8 outside the root, weight decay added to the gradient, heavy-ball momentum: the MLRC recipe).
    optim.name = "adamw"
    # RMSprop's momentum (unused by AdamW).
    optim.momentum = 0.9
    # Base learning rate (the backbone's).
    optim.lr = 1e-3
    # Weight decay, applied to every trainable group.
    optim.weight_decay = 1e-4
    # Learning-rate multipliers by parameter path, first match wins. Paths look like
    # 'model/backbone/...', 'model/embedding/kernel', 'proxies/0' (level 0), 'proxies/1', ..., and 'hier_proxies'
    # (HIER's, when hier.weight > 0, which then needs a rule: ('hier_proxies', 50.0) is HIER's own rate).
    optim.lr_mults = (("proxies/.*", 100.0),)
    # Epochs at the start during which only the parameters matching warmup_trainable train (HIER's recipe adds
    # 'hier_proxies').
    optim.warmup_epochs = 1
    optim.warmup_trainable = ("model/embedding/.*", "proxies/.*")
    # Parameters that never train (regexes on the same paths), e.g. BatchNorm scale/bias.
    optim.frozen = ()
    # Element-wise gradient clipping to [-clip, clip] (0 = off).
    optim.grad_clip_value = 10.0
    # A step whose loss, gradients or updated parameters are not finite stops the run (False), or is skipped,
    # leaving the state as it was (True); may be switched on when resuming a run that stopped on such a step.
    optim.skip_nonfinite_steps = False
    # Step decay: multiply the learning rate by gamma every decay_epochs epochs, counted from epoch 0.
    optim.decay_epochs = 5
    optim.decay_gamma = 0.5

    # Global batch size over all devices of all hosts (must divide by the device count).
    config.batch_size = 64
    config.num_epochs = 12
    # Optimiser steps per epoch; 0 = one pass over the training images (last partial batch dropped). MLRC counts
    # 100 iterations as an epoch. (TFDS datasets and image folders repeat the epoch's order for more than a pass.)
    config.steps_per_epoch = 0

    config.eval = eval_config = ml_collections.ConfigDict()
    # Evaluate on the test split every this many epochs (and always at the end, and at epoch 0).
    eval_config.every_epochs = 1
    # Stop once the last evaluation is more than this many epochs after the best one on the validation classes
    # (MLRC's patience; needs dataset.num_folds or dataset.num_val_classes). 0 = train all num_epochs.
    eval_config.early_stopping_patience = 0
    # Global batch size of evaluation (a multiple of the device count; the last batch is padded).
    eval_config.batch_size = 128
    # K of the Recall@K table.
    eval_config.recall_at = (1, 2, 4, 8)
    # Also compute NMI: hpl_jax.kmeans (on the default device) of the test embeddings into as many clusters as
    # classes, against the labels. Its cost per evaluation per dataset: docs/benchmarks.md, section "Evaluation".
    eval_config.nmi = True
    # Also the retrieval metrics at the ground-truth super-class level ('super/...'), where the dataset has
    # super-classes. They rank each query's first R items, R in the thousands for SOP (on the host on a CPU, by a
    # top-k on the device elsewhere); what they add to an SOP evaluation is measured in docs/benchmarks.md, section
    # "Evaluation".
    eval_config.super_metrics = True
    # The costly metrics (eval.nmi, eval.super_metrics) only every this many epochs (and at epoch 0 and the last
    # epoch); the other evaluations leave them out. Their cost at SOP scale, per evaluation (NMI: k-means of
    # 60,502 embeddings into 11,316; the super-class metrics), host work on a CPU and device work on a GPU or TPU,
    # is measured in docs/benchmarks.md, sections "Evaluation" and "On a GPU". checkpoint.best_metric 'nmi' needs 1.
    eval_config.costly_metrics_every_epochs = 1
    # Side of the similarity blocks of self-retrieval, or queries searched at once against the whole gallery
    # (hpl_jax.metrics.retrieval_metrics); memory is a few chunk_size x chunk_size (or x gallery) blocks.
    eval_config.chunk_size = 1024

    config.checkpoint = ckpt = ml_collections.ConfigDict()
    # Keep the last this many epoch checkpoints.
    ckpt.keep = 2
    # The metric the best epoch is chosen on, and best/ kept by ('' = no best/ checkpoint; the best epoch is then
    # chosen on recall@1). With validation classes it is read on them (val/map@r), else on test.
    ckpt.best_metric = "map@r"
    # Additionally save every this many steps inside an epoch (0 = only at epoch ends).
    ckpt.every_steps = 0

    # Progress line and TensorBoard scalars every this many steps.
    config.log_every_steps = 10
    # Pretraining: at the end of the run, write the backbone of its last state to WORKDIR/backbone in the format of
    # hpl_jax.convert_weights (orbax checkpoint + metadata.json with the preprocessing and the source dataset), which
    # --config.model.pretrained=WORKDIR/backbone loads in another run (configs/pretrain_synthetic.py).
    config.export_backbone = False
    # JAX's persistent compilation cache: compiled programs are kept in this directory (local, or gs:// beside the
    # workdir, e.g. gs://BUCKET/hpl_sop_compile_cache) and a restarted process loads them instead of compiling
    # again, which a Spot TPU or GPU pays at every preemption. Every host may share one directory. '' = off.
    config.compilation_cache_dir = ""
    return config

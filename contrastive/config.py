"""The config schemas: every field a run reads, with its default.

Experiment files in ``configs/`` start from :func:`base_config` (pretraining) or
:func:`downstream_config` (linear evaluation, fine-tuning) and change what their
recipe needs, so every run has every field and the command line can only override
fields that exist. :mod:`contrastive.config_checks` then checks the values, all of
them at once, before any data is read or any function compiled.
"""

import difflib

import ml_collections
from ml_collections import config_dict

from contrastive.data import augment_config

def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.method = 'simclr'                 # see contrastive.methods.METHODS
  config.global_batch_size = 256           # summed over all devices and processes
  config.num_epochs = 100.0
  config.log_every_steps = 50
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 2
  config.skip_nonfinite_steps = 0          # N > 0: skip such updates, stop after N in a row

  # Each method's own section, ``config.<name>``, with the defaults its module
  # gives (contrastive.methods); another method's config adds its own.
  from contrastive import methods  # pylint: disable=import-outside-toplevel
  for method in methods.METHODS.values():
    add_method_section(config, method)

  config.model = ml_collections.ConfigDict()
  # resnet10/18/34/50/101/152, or vit_tiny/small/base (their fields: model.vit)
  config.model.name = 'resnet50'
  config.model.width = 1.0                 # ResNet channel multiplier
  config.model.stem = 'imagenet'           # 'imagenet' (7x7/2 + max-pool) or 'cifar' (3x3/1)
  # The ResNet's normalisation: 'batch' (model.bn's), 'group' (model.group_norm_groups
  # groups), 'layer' (over the channels at each position, CPC v2's) or 'none'.
  config.model.norm = 'batch'
  config.model.group_norm_groups = 32
  # BatchNorm, in a ResNet and in the heads: 'global' (cross-replica statistics)
  # or 'local' (per device, the statistics then averaged over the devices).
  config.model.bn = 'global'
  config.model.bn_momentum = 0.9
  # Compute dtype of convolutions and dense layers: 'bfloat16', 'float32', or
  # 'auto' (bfloat16 on GPU and TPU, float32 on CPU). Parameters, optimizer state,
  # BN statistics and the loss are float32 in every case.
  config.model.precision = 'auto'
  # ResNet stages (1-4) whose activations are recomputed in the backward pass
  # instead of kept: less memory, about a third more compute for those stages.
  config.model.remat_stages = ()
  config.model.vit = ml_collections.ConfigDict()
  config.model.vit.patch_size = 16
  config.model.vit.pooling = 'token'       # 'token' (class token) or 'gap' (mean of patches)
  config.model.vit.position_embedding = 'learned'   # or 'sincos' (fixed 2-D, MoCo v3)
  config.model.vit.frozen_patch_projection = False  # MoCo v3's fixed random projection
  config.model.vit.drop_path_rate = 0.0    # stochastic depth at the last block
  config.model.vit.remat = False           # recompute each block in the backward pass
  # 0: the variant's (vit_small: 384 wide, 12 blocks, 6 heads, MLP 1536).
  config.model.vit.hidden_dim = 0
  config.model.vit.depth = 0
  config.model.vit.num_heads = 0
  config.model.vit.mlp_dim = 0

  config.head = ml_collections.ConfigDict()
  config.head.num_layers = 2               # 1 linear, 2 SimCLR v1, 3 SimCLR v2
  config.head.hidden_dim = 0               # 0: the encoder's feature width
  config.head.out_dim = 128
  config.head.use_bn = True
  config.head.output_bn = True             # with use_bn: BN (no centring) after the last layer

  # The predictor MLP on the online side (BYOL, MoCo v3): projection -> prediction
  # of the same size, head.out_dim.
  config.predictor = ml_collections.ConfigDict()
  config.predictor.num_layers = 2
  config.predictor.hidden_dim = 4096
  config.predictor.output_bn = False

  config.data = ml_collections.ConfigDict()
  config.data.source = 'tfds'              # 'tfds', 'folder' or 'digits'
  config.data.name = 'imagenet2012'        # TFDS builder
  config.data.data_dir = ml_collections.config_dict.placeholder(str)
  config.data.path = ''                    # image folder root
  config.data.eval_path = ''               # folder: a separate evaluation folder (e.g. val/)
  config.data.train_split = 'train'
  config.data.eval_split = 'validation'
  config.data.holdout_per_class = 0        # folder/digits: images per class kept for eval
  config.data.image_size = 224
  config.data.eval_crop_fraction = 0.875   # 256 -> 224 centre crop; 1.0 = none
  config.data.in_memory = False            # True: whole split in host RAM, crops on device
  # folder: an image with more pixels is skipped, named in a warning, in memory and
  # streamed alike (PIL's decompression-bomb limit; TFDS records have none).
  config.data.max_image_pixels = 89_478_485
  # Batches assembled on the host and sent to the devices ahead of the step that
  # takes them (a background thread); 0: each one when the step asks for it.
  config.data.prefetch = 2

  config.aug = augment_config.simclr_augment_config(strength=1.0, blur_prob=0.5)
  # The second view's augmentation, for methods whose two views differ (BYOL,
  # MoCo v3: blur and solarize); the others use config.aug for every view.
  config.aug2 = augment_config.simclr_augment_config(strength=1.0, blur_prob=0.5)

  config.optim = ml_collections.ConfigDict()
  config.optim.name = 'lars'               # 'lars', 'sgd' or 'adamw'
  config.optim.base_lr = 0.3
  config.optim.lr_scaling = 'linear'       # 'linear' (x B/256), 'sqrt' (x sqrt B), 'none'
  config.optim.warmup_epochs = 10.0
  config.optim.schedule = 'cosine'         # 'cosine' or 'steps' (x decay_factor at decay_epochs)
  config.optim.decay_epochs = ()
  config.optim.decay_factor = 0.1
  config.optim.weight_decay = 1e-6
  config.optim.momentum = 0.9
  config.optim.nesterov = False
  config.optim.trust_coefficient = 1e-3
  config.optim.adam_betas = (0.9, 0.999)   # AdamW only: the moments' decay rates

  config.eval = ml_collections.ConfigDict()
  config.eval.enabled = True               # kNN + linear probe at the end of training
  config.eval.compare_random_init = True   # also report the same net with random weights
  config.eval.batch_size = 512
  config.eval.knn_k = 200
  config.eval.knn_temperature = 0.1
  config.eval.probe_epochs = 100
  config.eval.probe_learning_rate = 1e-2
  config.eval.knn_every_epochs = 0.0       # kNN monitor during training; 0: off
  config.eval.online_probe = True          # linear probe on the step's features (labelled data)
  config.eval.online_probe_learning_rate = 1e-3
  return config


def add_method_section(config: ml_collections.ConfigDict, method) -> None:
  """``config.<method.name>``: the method's own section with its defaults (none
  for a method without one). A method from outside the library brings its
  section so: ``add_method_section(config, MY_METHOD)``."""
  section = method.default_config()
  if section is not None:
    config[method.name] = section


def downstream_config() -> ml_collections.ConfigDict:
  """Every field of a downstream run, with its default."""
  config = ml_collections.ConfigDict()
  config.pretrained = ''                   # workdir of the pretraining run (required)
  config.pretrained_step = config_dict.placeholder(int)  # None: its latest checkpoint
  config.mode = 'linear'                   # 'linear' or 'finetune'
  # Hidden layers of the pretrained projection head kept under the classifier,
  # frozen or trained with the encoder: 0 the encoder's features; 1 SimCLR v2's
  # fine-tuning from the head's first layer (Dense -> BN -> ReLU).
  config.head_layers = 0
  config.label_fraction = 1.0              # class-balanced subset of the training labels
  config.subset_seed = 0                   # fixes that subset, whatever config.seed is
  config.seed = 0
  config.global_batch_size = 256
  config.num_epochs = 100.0
  config.log_every_steps = 50
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 2
  config.eval_batch_size = 512

  # Unset (None) fields take the pretraining run's value.
  config.data = ml_collections.ConfigDict()
  pretraining_data = base_config().data
  for name in pretraining_data.keys():
    config.data[name] = config_dict.placeholder(pretraining_data.get_ref(name).get_type())

  # Training images get a random resized crop and a flip, nothing else; evaluation
  # images a centre crop of data.eval_crop_fraction.
  config.aug = ml_collections.ConfigDict()
  config.aug.crop_area = (0.08, 1.0)
  config.aug.crop_aspect = (3 / 4, 4 / 3)
  config.aug.flip_prob = 0.5

  config.optim = ml_collections.ConfigDict()
  config.optim.name = 'sgd'                # any of contrastive.optim.OPTIMIZERS
  config.optim.base_lr = 0.1
  config.optim.lr_scaling = 'linear'       # 'linear' (x B/256), 'sqrt' (x sqrt B), 'none'
  config.optim.momentum = 0.9
  config.optim.nesterov = False
  config.optim.weight_decay = 0.0          # kernels only, never biases or BN
  config.optim.trust_coefficient = 1e-3    # LARS only
  config.optim.adam_betas = (0.9, 0.999)   # AdamW only
  config.optim.warmup_epochs = 0.0          # linear warmup from 0, then the schedule
  config.optim.schedule = 'cosine'         # 'cosine' to 0, or 'steps'
  config.optim.decay_epochs = (60.0, 80.0)  # 'steps': lr x decay_factor at each
  config.optim.decay_factor = 0.1
  return config


def unknown_fields(config: ml_collections.ConfigDict) -> dict[str, str | None]:
  """The fields of ``config`` that its schema lacks (nothing reads them: a
  misspelt or stale name), each dotted path with the closest field of its section
  (None where none is close). The schema is :func:`downstream_config` for a config
  with a ``pretrained`` field, :func:`base_config` otherwise."""
  schema = downstream_config() if 'pretrained' in config else base_config()
  return _unknown_fields(config, schema, '')


def _unknown_fields(section, schema, prefix: str) -> dict[str, str | None]:
  unknown = {}
  for name, value in section.items():
    if name not in schema:
      close = difflib.get_close_matches(name, list(schema), n=1)
      unknown[prefix + name] = prefix + close[0] if close else None
    elif isinstance(value, ml_collections.ConfigDict) and isinstance(
        schema[name], ml_collections.ConfigDict):
      unknown.update(_unknown_fields(value, schema[name], f'{prefix}{name}.'))
  return unknown


def negatives_study_config() -> ml_collections.ConfigDict:
  """Every field of a negatives study (``contrastive.studies.negatives``)."""
  config = ml_collections.ConfigDict()
  config.base = base_config()              # what every run shares
  config.temperature = 0.1                 # every method's softmax temperature
  config.batch_size = 128                  # memory bank and MoCo
  config.simclr_batch_sizes = (32, 128, 512)        # 2B - 2 negatives each
  config.membank_negatives = (256, 1024, 4096)
  config.moco_queue_sizes = (256, 1024, 4096)
  # Instance classification, all N - 1 other images as negatives: one run per
  # (contrastive prior, label smoothing alpha) pair.
  config.instance_cls_variants = ((False, 0.0), (True, 0.0), (False, 0.2), (True, 0.2))
  return config

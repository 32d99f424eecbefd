"""The config schema: every field a run reads, with its default.

Experiment files in ``configs/`` start from :func:`base_config` and change what
their recipe needs, so every run has every field and the command line can only
override fields that exist.
"""

import ml_collections

from contrastive.data import augment


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.method = 'simclr'                 # see contrastive.methods.METHODS
  config.global_batch_size = 256           # summed over all devices and processes
  config.num_epochs = 100.0
  config.log_every_steps = 50
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 2

  config.simclr = ml_collections.ConfigDict()
  config.simclr.temperature = 0.1

  config.moco = ml_collections.ConfigDict()
  config.moco.queue_size = 65536           # K keys, split across devices; multiple of the batch
  config.moco.momentum = 0.999             # key encoder EMA
  config.moco.momentum_schedule = 'constant'  # or 'cosine' (from momentum towards 1)
  config.moco.temperature = 0.07
  config.moco.key_bn = 'shuffle'           # key encoder BN: 'shuffle', 'global' or 'local'
  config.moco.symmetric = False            # both views as queries (sum of both losses)

  config.membank = ml_collections.ConfigDict()
  config.membank.num_negatives = 4096      # bank rows drawn per step; 0: the whole bank
  config.membank.momentum = 0.5            # bank row <- m * row + (1 - m) * new embedding
  config.membank.temperature = 0.07

  config.model = ml_collections.ConfigDict()
  config.model.name = 'resnet50'           # resnet10/18/34/50/101/152
  config.model.width = 1.0                 # channel multiplier
  config.model.stem = 'imagenet'           # 'imagenet' (7x7/2 + max-pool) or 'cifar' (3x3/1)
  config.model.bn = 'global'               # 'global': cross-replica statistics; 'local'
  config.model.bn_momentum = 0.9

  config.head = ml_collections.ConfigDict()
  config.head.num_layers = 2               # 1 linear, 2 SimCLR v1, 3 SimCLR v2
  config.head.hidden_dim = 0               # 0: the encoder's feature width
  config.head.out_dim = 128
  config.head.use_bn = True

  config.data = ml_collections.ConfigDict()
  config.data.source = 'tfds'              # 'tfds', 'folder' or 'digits'
  config.data.name = 'imagenet2012'        # TFDS builder
  config.data.data_dir = ml_collections.config_dict.placeholder(str)
  config.data.path = ''                    # image folder root
  config.data.train_split = 'train'
  config.data.eval_split = 'validation'
  config.data.holdout_per_class = 0        # folder/digits: images per class kept for eval
  config.data.image_size = 224
  config.data.eval_crop_fraction = 0.875   # 256 -> 224 centre crop; 1.0 = none
  config.data.in_memory = False            # True: whole split in host RAM, crops on device

  config.aug = augment.simclr_augment_config(strength=1.0, blur_prob=0.5)

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

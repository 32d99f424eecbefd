"""Instance discrimination with a memory bank (Wu et al. 2018) on CIFAR-10, ResNet-18.

    python -m contrastive.main --config=configs/membank_cifar10.py --workdir=/tmp/membank

One 128-d bank row per training image (momentum 0.5), 4096 negatives drawn from
the bank per step (``--config.membank.num_negatives=0``: the whole bank),
temperature 0.07, a linear head, MoCo v1's augmentation, SGD lr 0.03 x B/256 with
weight decay 5e-4, 200 epochs, lr x0.1 at 120 and 160. Data options as in
configs/moco_v2_cifar10.py.
"""

from contrastive.config import base_config
from contrastive.data import augment_config


def get_config(arg=None):
  del arg
  config = base_config()
  config.method = 'membank'
  config.global_batch_size = 256
  config.num_epochs = 200.0
  config.log_every_steps = 20
  config.checkpoint_every_steps = 2000

  config.membank.num_negatives = 4096
  config.membank.momentum = 0.5
  config.membank.temperature = 0.07

  config.model.name = 'resnet18'
  config.model.stem = 'cifar'
  config.model.bn = 'global'
  config.head.num_layers = 1
  config.head.out_dim = 128
  config.head.use_bn = False

  config.data.source = 'tfds'
  config.data.name = 'cifar10'
  config.data.train_split = 'train'
  config.data.eval_split = 'test'
  config.data.image_size = 32
  config.data.eval_crop_fraction = 1.0
  config.data.in_memory = True
  config.aug = augment_config.moco_augment_config(version=1)
  config.aug.mean = augment_config.CIFAR10_MEAN
  config.aug.std = augment_config.CIFAR10_STD

  config.optim.name = 'sgd'
  config.optim.base_lr = 0.03
  config.optim.lr_scaling = 'linear'
  config.optim.warmup_epochs = 0.0
  config.optim.schedule = 'steps'
  config.optim.decay_epochs = (120.0, 160.0)
  config.optim.weight_decay = 5e-4
  config.optim.momentum = 0.9
  return config

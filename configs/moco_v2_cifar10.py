"""MoCo v2 on CIFAR-10, ResNet-18 with the CIFAR stem (MoCo's CIFAR-10 recipe).

    python -m contrastive.main --config=configs/moco_v2_cifar10.py --workdir=/tmp/moco_cifar10

``get_config('symmetric')`` (``--config=configs/moco_v2_cifar10.py:symmetric``) uses
both views as queries and sums the two losses. Queue K=4096, momentum 0.99,
temperature 0.1, shuffle BN over 8 groups of the key batch (the demo's split
BatchNorm, so one device has it too), batch 512, SGD lr 0.06 x B/512 with cosine decay, weight decay
5e-4, 200 epochs; published kNN top-1 (k=200) at 200 epochs: 82.6 (asymmetric),
85.3 (symmetric). The data comes from TFDS (``--config.data.data_dir``); for a
folder of CIFAR-10 images, one sub-folder per class, 500 per class held out:

    python -m contrastive.main --config=configs/moco_v2_cifar10.py --workdir=/tmp/run \
        --config.data.source=folder --config.data.path=/data/cifar10/train \
        --config.data.holdout_per_class=500
"""

from contrastive.config import base_config
from contrastive.data import augment_config

ARGS = ('symmetric',)


def get_config(arg=None):
  if arg not in (None, *ARGS):
    raise ValueError(f'configs/moco_v2_cifar10.py:{arg}; valid arguments: {", ".join(ARGS)}')
  config = base_config()
  config.method = 'moco'
  config.global_batch_size = 512
  config.num_epochs = 200.0
  config.log_every_steps = 20
  config.checkpoint_every_steps = 2000

  config.moco.queue_size = 4096
  config.moco.momentum = 0.99
  config.moco.temperature = 0.1
  config.moco.key_bn = 'shuffle'
  config.moco.bn_groups = 8                # split BN: shuffle BN on 1, 2, 4 or 8 devices
  config.moco.symmetric = arg == 'symmetric'

  config.model.name = 'resnet18'
  config.model.stem = 'cifar'
  config.model.bn = 'local'
  config.head.num_layers = 2
  config.head.out_dim = 128
  config.head.use_bn = False

  config.data.source = 'tfds'
  config.data.name = 'cifar10'
  config.data.train_split = 'train'
  config.data.eval_split = 'test'
  config.data.image_size = 32
  config.data.eval_crop_fraction = 1.0
  config.data.in_memory = True
  config.aug = augment_config.moco_augment_config(version=2)
  config.aug.blur_prob = 0.0               # no blur at 32x32
  config.aug.mean = augment_config.CIFAR10_MEAN
  config.aug.std = augment_config.CIFAR10_STD

  config.optim.name = 'sgd'
  config.optim.base_lr = 0.06 * 256 / 512  # 0.06 at batch 512
  config.optim.lr_scaling = 'linear'
  config.optim.warmup_epochs = 0.0
  config.optim.weight_decay = 5e-4
  config.optim.momentum = 0.9
  return config

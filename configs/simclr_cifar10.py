"""SimCLR on CIFAR-10, ResNet-18 with the CIFAR stem (the SimCLR README recipe).

    python -m contrastive.main --config=configs/simclr_cifar10.py --workdir=/tmp/simclr_cifar10

Batch 512, LARS with lr 1.0 x B/256, temperature 0.5, colour strength 0.5, no blur,
1000 epochs (about 91% linear top-1 published). The data comes from TFDS
(``--config.data.data_dir``); for a folder of CIFAR-10 images, one sub-folder per
class, with 500 images per class held out for evaluation:

    python -m contrastive.main --config=configs/simclr_cifar10.py --workdir=/tmp/run \
        --config.data.source=folder --config.data.path=/data/cifar10/train \
        --config.data.holdout_per_class=500
"""

from contrastive.config import base_config
from contrastive.data import augment_config


def get_config(arg=None):
  del arg
  config = base_config()
  config.global_batch_size = 512
  config.num_epochs = 1000.0
  config.log_every_steps = 50
  config.checkpoint_every_steps = 2000
  config.simclr.temperature = 0.5

  config.model.name = 'resnet18'
  config.model.stem = 'cifar'

  config.data.source = 'tfds'
  config.data.name = 'cifar10'
  config.data.train_split = 'train'
  config.data.eval_split = 'test'
  config.data.image_size = 32
  config.data.eval_crop_fraction = 1.0
  config.data.in_memory = True

  config.aug = augment_config.simclr_augment_config(strength=0.5, blur_prob=0.0)

  config.optim.name = 'lars'
  config.optim.base_lr = 1.0
  config.optim.lr_scaling = 'linear'
  config.optim.warmup_epochs = 10.0
  config.optim.weight_decay = 1e-4
  return config

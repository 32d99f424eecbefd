"""BYOL on CIFAR-10, ResNet-18 with the CIFAR stem (solo-learn's CIFAR recipe).

    python -m contrastive.main --config=configs/byol_cifar10.py --workdir=/tmp/byol_cifar10

Batch 256, LARS lr 1.0 x B/256 with trust coefficient 0.02, biases and BN
excluded, 10 warmup epochs then cosine, weight decay 1e-5, 1000 epochs;
projector and predictor MLPs 4096 -> 256; target momentum 0.99 rising to 1
(cosine); asymmetric views without blur (32 px), solarize 0 / 0.2. solo-learn
reports 92.58% online linear top-1 at 1000 epochs; lightly's BYOL reaches 86.8%
kNN at 200 epochs (batch 512). solo-learn also clips LARS's adaptive learning
rate at the base rate (``clip_lr``), which optax's LARS does not. The data comes
from TFDS (``--config.data.data_dir``); for a folder of CIFAR-10 images, one
sub-folder per class, 500 per class held out:

    python -m contrastive.main --config=configs/byol_cifar10.py --workdir=/tmp/run \
        --config.data.source=folder --config.data.path=/data/cifar10/train \
        --config.data.holdout_per_class=500
"""

from contrastive.config import base_config
from contrastive.data import augment_config


def get_config(arg=None):
  del arg
  config = base_config()
  config.method = 'byol'
  config.global_batch_size = 256
  config.num_epochs = 1000.0
  config.log_every_steps = 50
  config.checkpoint_every_steps = 2000
  config.byol.momentum = 0.99
  config.byol.momentum_schedule = 'cosine'

  config.model.name = 'resnet18'
  config.model.stem = 'cifar'
  config.head.num_layers = 2
  config.head.hidden_dim = 4096
  config.head.out_dim = 256
  config.head.output_bn = False
  config.predictor.hidden_dim = 4096

  config.data.source = 'tfds'
  config.data.name = 'cifar10'
  config.data.train_split = 'train'
  config.data.eval_split = 'test'
  config.data.image_size = 32
  config.data.eval_crop_fraction = 1.0
  config.data.in_memory = True
  config.aug = augment_config.byol_augment_config(blur_prob=0.0, solarize_prob=0.0)
  config.aug2 = augment_config.byol_augment_config(blur_prob=0.0, solarize_prob=0.2)
  for aug in (config.aug, config.aug2):
    aug.mean, aug.std = augment_config.CIFAR10_MEAN, augment_config.CIFAR10_STD

  config.optim.name = 'lars'
  config.optim.base_lr = 1.0
  config.optim.lr_scaling = 'linear'
  config.optim.warmup_epochs = 10.0
  config.optim.weight_decay = 1e-5
  config.optim.trust_coefficient = 0.02
  return config

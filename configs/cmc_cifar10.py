"""CMC (Tian et al. 2019) on CIFAR-10: L against ab, ResNet-18 with the CIFAR stem.

    python -m contrastive.main --config=configs/cmc_cifar10.py --workdir=/tmp/cmc_cifar10

``--config.cmc.negatives=queue`` uses MoCo-style key encoders and queues of 16384
keys (momentum 0.999) instead of the memory banks. Data options as in
configs/moco_v2_cifar10.py.

From CMC's released ImageNet code (train_CMC.py and its README): the L / ab
split, 4096 negatives drawn from one memory bank per view with momentum 0.5, a
linear 128-d head on each encoder, the sum of the two directions, a random
resized crop and a flip as the only augmentation, SGD with lr 0.03 at batch
256, momentum 0.9, weight decay 1e-4 and step decays of x0.1. The loss is the
softmax cross-entropy (InfoNCE) form; the release trains with NCE, a binary
estimate of the same softmax, which this library does not have. Temperature 0.1 is
the README's value for STL-10 (0.07 for ImageNet): CMC publishes no CIFAR-10
recipe, so the rest is this config's choice and unchecked against any published
figure: crop area (0.2, 1) (MoCo's CIFAR value; CMC's release uses 0.08 at
224 px), 200 epochs with the decays at 120 and 160 (CMC's ImageNet schedule is
400 epochs, decays at 250, 300 and 350), and ``model.width=1``: each view's
ResNet-18 at width 0.5, stem included (CMC's half-width ResNets keep a 64-channel
stem).
"""

from contrastive.config import base_config
from contrastive.data import augment_config


def get_config(arg=None):
  del arg
  config = base_config()
  config.method = 'cmc'
  config.global_batch_size = 256
  config.num_epochs = 200.0
  config.log_every_steps = 20
  config.checkpoint_every_steps = 2000

  config.cmc.temperature = 0.1
  config.cmc.negatives = 'membank'
  config.cmc.num_negatives = 4096
  config.cmc.bank_momentum = 0.5
  config.cmc.queue_size = 16384
  config.cmc.momentum = 0.999

  config.model.name = 'resnet18'
  config.model.width = 1.0                 # the pair: each view's ResNet at 0.5
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
  # Crop and flip only; the network converts RGB in [0, 1] to Lab and normalises it.
  config.aug = augment_config.simclr_augment_config(blur_prob=0.0)
  config.aug.crop_area = (0.2, 1.0)
  config.aug.color_jitter_prob = 0.0
  config.aug.grayscale_prob = 0.0

  config.optim.name = 'sgd'
  config.optim.base_lr = 0.03
  config.optim.lr_scaling = 'linear'
  config.optim.warmup_epochs = 0.0
  config.optim.schedule = 'steps'
  config.optim.decay_epochs = (120.0, 160.0)
  config.optim.weight_decay = 1e-4
  config.optim.momentum = 0.9
  return config

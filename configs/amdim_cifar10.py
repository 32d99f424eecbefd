"""AMDIM (Bachman et al. 2019) on CIFAR-10; ``get_config('dim')``: DIM's local objective.

    python -m contrastive.main --config=configs/amdim_cifar10.py --workdir=/tmp/amdim_cifar10
    python -m contrastive.main --config=configs/amdim_cifar10.py:dim --workdir=/tmp/dim_cifar10

From the paper's release (Philip-Bachman/amdim-public, train.py, costs.py,
task_self_supervised.py, datasets.py): n_rkhs 1024, scores / sqrt(n_rkhs), the
regulariser 0.05 x mean(score^2), the clip 20 x tanh(s / 20), the terms 1 -> 5,
1 -> 7 and 5 -> 5 in both directions, negatives every location of every other
image; Adam lr 2e-4, betas (0.8, 0.999), weight decay 1e-5 (coupled L2 there,
decoupled AdamW here), batch 200, 300 epochs with lr x 0.2 at 250 and 280 (the
release also warms the lr up over its first steps; one epoch here); colour
jitter (0.4, 0.4, 0.4, 0.2) with probability 0.8, grayscale 0.25, flips, the
CIFAR mean and std. Its random 4 px translation (reflect padding, probability
0.8) is a crop of 70-100% of the image here. The encoder is not the release's
(ndf 128, no BatchNorm, valid convolutions giving 7 x 7 and 5 x 5 maps): a
ResNet-18 with the CIFAR stem and cross-replica BatchNorm, whose stages 3 and 4
give 8 x 8 and 4 x 4 maps. AMDIM's CIFAR-10 linear figure, 91.2%, is from a
secondary source. ``dim``: one view against its own local features, the
global -> fine term only, in InfoNCE form (DIM's default estimator is the
Jensen-Shannon one, not provided), as DIM's Adam lr 1e-4, batch 64 would be.
"""

from contrastive.config import base_config
from contrastive.data import augment_config


def get_config(arg=None):
  config = base_config()
  config.method = 'amdim'
  config.global_batch_size = 200
  config.num_epochs = 300.0
  config.log_every_steps = 50
  config.checkpoint_every_steps = 2000

  config.amdim.embed_dim = 1024
  config.amdim.score_clip = 20.0
  config.amdim.score_penalty = 0.05
  config.amdim.local_maps = ('stage3', 'stage4')
  config.amdim.terms = ('global_fine', 'global_coarse', 'coarse_coarse')
  config.amdim.two_views = True

  config.model.name = 'resnet18'
  config.model.stem = 'cifar'

  config.data.source = 'tfds'
  config.data.name = 'cifar10'
  config.data.train_split = 'train'
  config.data.eval_split = 'test'
  config.data.image_size = 32
  config.data.eval_crop_fraction = 1.0
  config.data.in_memory = True
  config.aug = augment_config.simclr_augment_config(blur_prob=0.0)
  config.aug.crop_area = (0.7, 1.0)
  config.aug.brightness = config.aug.contrast = config.aug.saturation = 0.4
  config.aug.hue = 0.2
  config.aug.grayscale_prob = 0.25
  config.aug.mean = (125.3 / 255, 123.0 / 255, 113.9 / 255)
  config.aug.std = (63.0 / 255, 62.1 / 255, 66.7 / 255)

  config.optim.name = 'adamw'
  config.optim.base_lr = 2e-4
  config.optim.lr_scaling = 'none'
  config.optim.adam_betas = (0.8, 0.999)
  config.optim.weight_decay = 1e-5
  config.optim.warmup_epochs = 1.0
  config.optim.schedule = 'steps'
  config.optim.decay_epochs = (250.0, 280.0)
  config.optim.decay_factor = 0.2
  if arg == 'dim':
    config.amdim.terms = ('global_fine',)
    config.amdim.two_views = False
    config.global_batch_size = 64
    config.optim.base_lr = 1e-4
    config.optim.adam_betas = (0.9, 0.999)
  elif arg is not None:
    raise ValueError(f'configs/amdim_cifar10.py:{arg}; valid: (none), dim')
  return config

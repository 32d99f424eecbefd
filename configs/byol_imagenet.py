"""BYOL on ImageNet, ResNet-50, batch 4096, LARS (the paper's recipe).

    python -m contrastive.main --config=configs/byol_imagenet.py \
        --workdir=gs://bucket/byol_imagenet --config.data.data_dir=gs://bucket/tfds \
        --distributed

LARS lr 0.2 x B/256 with 10 warmup epochs then cosine, weight decay 1.5e-6,
biases and BN excluded from both; projector and predictor MLPs 4096 -> 256;
target momentum 0.996 rising to 1 (cosine); views: blur 1.0 / 0.1, solarize
0 / 0.2, ImageNet mean/std. 1000 epochs (``get_config('300')``: 300 epochs,
where the paper uses lr 0.3 and weight decay 1e-6). imagenet2012 must be
prepared with TFDS beforehand (manual download).
"""

from contrastive.config import base_config
from contrastive.data import augment_config

ARGS = ('300',)


def get_config(arg=None):
  if arg not in (None, *ARGS):
    raise ValueError(f'configs/byol_imagenet.py:{arg}; valid arguments: {", ".join(ARGS)}')
  short = arg == '300'
  config = base_config()
  config.method = 'byol'
  config.global_batch_size = 4096
  config.num_epochs = 300.0 if short else 1000.0
  config.log_every_steps = 100
  config.checkpoint_every_steps = 2500
  config.byol.momentum = 0.996
  config.byol.momentum_schedule = 'cosine'

  config.model.name = 'resnet50'
  config.model.stem = 'imagenet'
  config.head.num_layers = 2
  config.head.hidden_dim = 4096
  config.head.out_dim = 256
  config.head.output_bn = False
  config.predictor.hidden_dim = 4096

  config.data.source = 'tfds'
  config.data.name = 'imagenet2012'
  config.data.train_split = 'train'
  config.data.eval_split = 'validation'
  config.data.image_size = 224
  config.data.eval_crop_fraction = 0.875
  config.data.in_memory = False
  config.aug = augment_config.byol_augment_config(blur_prob=1.0, solarize_prob=0.0)
  config.aug2 = augment_config.byol_augment_config(blur_prob=0.1, solarize_prob=0.2)
  for aug in (config.aug, config.aug2):
    aug.mean, aug.std = augment_config.IMAGENET_MEAN, augment_config.IMAGENET_STD

  config.optim.name = 'lars'
  config.optim.base_lr = 0.3 if short else 0.2
  config.optim.lr_scaling = 'linear'
  config.optim.warmup_epochs = 10.0
  config.optim.weight_decay = 1e-6 if short else 1.5e-6
  config.eval.probe_epochs = 10
  return config

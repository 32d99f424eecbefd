"""MoCo v3 on ImageNet, ResNet-50, batch 4096, LARS (the moco-v3 release's recipe).

    python -m contrastive.main --config=configs/moco_v3_imagenet.py:300 \
        --workdir=gs://bucket/moco_v3_imagenet --config.data.data_dir=gs://bucket/tfds \
        --distributed

``get_config(epochs)`` with 100 (default), 300 or 1000 epochs: LARS lr 0.6 x B/256
and weight decay 1e-6 for 100 epochs, 0.3 and 1.5e-6 for 300 and 1000; key
momentum 0.99 (0.996 for 1000) rising to 1 (cosine); 10 warmup epochs, then
cosine; T = 1.0 with the loss scaled by 2T; projector 2048 -> 4096 -> 256 ending
in BatchNorm (the release's has neither scale nor shift there, this one keeps
the scale), predictor 256 -> 4096 -> 256; BYOL's asymmetric views, crop area
from 0.08. The figures are the release's README as recalled, not checked here.
imagenet2012 must be prepared with TFDS beforehand (manual download).
"""

from contrastive.config import base_config
from contrastive.data import augment_config

ARGS = ('100', '300', '1000')


def get_config(arg=None):
  if arg not in (None, *ARGS):
    raise ValueError(f'configs/moco_v3_imagenet.py:{arg}; valid arguments: {", ".join(ARGS)}')
  epochs = int(arg or 100)
  config = base_config()
  config.method = 'moco_v3'
  config.global_batch_size = 4096
  config.num_epochs = float(epochs)
  config.log_every_steps = 100
  config.checkpoint_every_steps = 2500
  config.moco_v3.temperature = 1.0
  config.moco_v3.momentum = 0.996 if epochs == 1000 else 0.99
  config.moco_v3.momentum_schedule = 'cosine'

  config.model.name = 'resnet50'
  config.model.stem = 'imagenet'
  config.head.num_layers = 2
  config.head.hidden_dim = 4096
  config.head.out_dim = 256
  config.head.output_bn = True
  config.predictor.hidden_dim = 4096
  config.predictor.output_bn = False

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
  config.optim.base_lr = 0.6 if epochs == 100 else 0.3
  config.optim.lr_scaling = 'linear'
  config.optim.warmup_epochs = 10.0
  config.optim.weight_decay = 1e-6 if epochs == 100 else 1.5e-6
  config.eval.probe_epochs = 10
  return config

"""SimCLR on ImageNet, ResNet-50, batch 4096, LARS (the paper's recipe).

    python -m contrastive.main --config=configs/simclr_imagenet.py \
        --workdir=gs://bucket/simclr_imagenet --config.data.data_dir=gs://bucket/tfds \
        --distributed

Temperature 0.1, lr 0.3 x B/256 with 10 warmup epochs then cosine, weight decay
1e-6, colour strength 1.0 with blur, 2-layer head (``get_config('v2')``: 3-layer
SimCLR v2 head). 100 epochs give about 64.5% linear top-1, 1000 epochs 69.1%.
imagenet2012 must be prepared with TFDS beforehand (manual download).
"""

from contrastive.config import base_config


def get_config(arg=None):
  config = base_config()
  config.global_batch_size = 4096
  config.num_epochs = 100.0
  config.log_every_steps = 100
  config.checkpoint_every_steps = 2500
  config.simclr.temperature = 0.1

  config.model.name = 'resnet50'
  config.model.stem = 'imagenet'
  config.head.num_layers = 3 if arg == 'v2' else 2

  config.data.source = 'tfds'
  config.data.name = 'imagenet2012'
  config.data.train_split = 'train'
  config.data.eval_split = 'validation'
  config.data.image_size = 224
  config.data.eval_crop_fraction = 0.875
  config.data.in_memory = False

  config.optim.name = 'lars'
  config.optim.base_lr = 0.3
  config.optim.lr_scaling = 'linear'
  config.optim.warmup_epochs = 10.0
  config.optim.weight_decay = 1e-6
  config.eval.probe_epochs = 10
  return config

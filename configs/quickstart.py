"""SimCLR on scikit-learn's handwritten digits: a few minutes on 2 CPU cores, offline.

    python -m contrastive.main --config=configs/quickstart.py --workdir=/tmp/quickstart

The 1,797 8x8 digits ship inside scikit-learn; they are upsampled to 16x16 and 50
per class are held out for the final kNN / linear-probe evaluation, which also
reports the same network with random weights.
"""

from contrastive.config import base_config


def get_config(arg=None):
  del arg
  config = base_config()
  config.global_batch_size = 128
  config.num_epochs = 30.0
  config.log_every_steps = 10
  config.checkpoint_every_steps = 50
  config.simclr.temperature = 0.5

  config.model.name = 'resnet18'
  config.model.width = 0.25
  config.model.stem = 'cifar'
  config.head.out_dim = 64

  config.data.source = 'digits'
  config.data.holdout_per_class = 50
  config.data.image_size = 16
  config.data.eval_crop_fraction = 1.0
  config.data.in_memory = True

  config.aug.crop_area = (0.3, 1.0)
  config.aug.flip_prob = 0.0               # mirrored digits are other shapes
  config.aug.blur_prob = 0.0

  config.optim.name = 'lars'
  config.optim.base_lr = 1.0
  config.optim.warmup_epochs = 3.0
  config.optim.weight_decay = 1e-4
  config.eval.batch_size = 256
  config.eval.knn_k = 20                   # 130 training images per class
  return config

"""MoCo v1 on ImageNet, ResNet-50 (He et al. 2019), 200 epochs.

    python -m contrastive.main --config=configs/moco_v1_imagenet.py \
        --workdir=gs://bucket/moco_v1 --config.data.data_dir=gs://bucket/tfds --distributed

Queue K=65536 of 128-d keys from a linear head, key-encoder momentum 0.999,
temperature 0.07, shuffle BN, per-device BN in the query encoder (as with plain
DistributedDataParallel), SGD lr 0.03 x B/256, weight decay 1e-4, lr x0.1 at
epochs 120 and 160. Published: 60.8 +- 0.2 linear top-1 (MoCo protocol:
configs/linear_eval_moco.py).
"""

from contrastive.config import base_config
from contrastive.data import augment_config


def get_config(arg=None):
  del arg
  config = base_config()
  config.method = 'moco'
  config.global_batch_size = 256
  config.num_epochs = 200.0
  config.log_every_steps = 100
  config.checkpoint_every_steps = 5000

  config.moco.queue_size = 65536
  config.moco.momentum = 0.999
  config.moco.temperature = 0.07
  config.moco.key_bn = 'shuffle'
  config.moco.symmetric = False

  config.model.name = 'resnet50'
  config.model.bn = 'local'
  config.head.num_layers = 1
  config.head.out_dim = 128
  config.head.use_bn = False

  config.data.source = 'tfds'
  config.data.name = 'imagenet2012'
  config.data.image_size = 224
  config.aug = augment_config.moco_augment_config(version=1)

  config.optim.name = 'sgd'
  config.optim.base_lr = 0.03
  config.optim.lr_scaling = 'linear'
  config.optim.warmup_epochs = 0.0
  config.optim.schedule = 'steps'
  config.optim.decay_epochs = (120.0, 160.0)
  config.optim.weight_decay = 1e-4
  config.optim.momentum = 0.9
  config.eval.knn_k = 20
  return config

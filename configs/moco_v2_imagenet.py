"""MoCo v2 on ImageNet, ResNet-50 (Chen et al. 2020), 200 epochs.

    python -m contrastive.main --config=configs/moco_v2_imagenet.py \
        --workdir=gs://bucket/moco_v2 --config.data.data_dir=gs://bucket/tfds --distributed

MoCo v1 plus a 2-layer MLP head (2048-2048-128, no BN), temperature 0.2, blur in
the augmentation and a cosine learning rate. Published: 67.5 +- 0.1 linear top-1
after 200 epochs, 71.1 after 800 (``--config.num_epochs=800``).
"""

from configs import moco_v1_imagenet
from contrastive.data import augment_config


def get_config(arg=None):
  config = moco_v1_imagenet.get_config(arg)
  config.moco.temperature = 0.2
  config.head.num_layers = 2
  config.head.hidden_dim = 0               # the encoder's width: 2048 for ResNet-50
  config.aug = augment_config.moco_augment_config(version=2)
  config.optim.schedule = 'cosine'
  config.optim.decay_epochs = ()
  return config

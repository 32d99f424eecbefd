"""Instance classification on ImageNet: the one-million-way instance classifier.

    python -m contrastive.main --config=configs/instance_cls_imagenet.py \
        --workdir=gs://bucket/instance_cls --config.data.data_dir=gs://bucket/tfds --distributed

Liu et al., "Train a One-Million-Way Instance Classifier for Unsupervised Visual
Representation Learning" (AAAI 2021), ResNet-50: every one of the 1,281,167
training images is a class of a cosine classifier whose rows are split across
the devices (on 64 GPUs, 20,019 rows each), initialised with the random network's
features (the contrastive prior), with labels smoothed over each image's hardest
classes. The paper's training: SGD, momentum 0.9, weight decay 1e-4, lr 0.48,
cosine decay after 10 warmup epochs, on 64 V100s. Batch 4096 is the batch at which
lr 0.48 is MoCo's 0.03 x B/256; 200 epochs, temperature 0.2, K = 5 and alpha = 0.2
are this file's choices and could not be checked against the paper's text where
it was written: check them before comparing with the paper's table.
"""

from contrastive.config import base_config
from contrastive.data import augment_config


def get_config(arg=None):
  del arg
  config = base_config()
  config.method = 'instance_cls'
  config.global_batch_size = 4096
  config.num_epochs = 200.0
  config.log_every_steps = 100
  config.checkpoint_every_steps = 1000

  config.instance_cls.temperature = 0.2
  config.instance_cls.normalize = True
  config.instance_cls.contrastive_prior = True
  config.instance_cls.smoothing = 0.2
  config.instance_cls.smoothing_neighbours = 5
  config.instance_cls.neighbour_chunk = 4096

  config.model.name = 'resnet50'
  config.model.bn = 'global'
  config.head.num_layers = 2
  config.head.hidden_dim = 0               # the encoder's width: 2048
  config.head.out_dim = 128
  config.head.use_bn = True

  config.data.source = 'tfds'
  config.data.name = 'imagenet2012'
  config.data.image_size = 224
  config.aug = augment_config.moco_augment_config(version=2)

  config.optim.name = 'sgd'
  config.optim.base_lr = 0.03              # x 4096 / 256 = 0.48
  config.optim.lr_scaling = 'linear'
  config.optim.warmup_epochs = 10.0
  config.optim.schedule = 'cosine'
  config.optim.weight_decay = 1e-4
  config.optim.momentum = 0.9
  return config

"""CPC v2 (Henaff et al. 2020) on ImageNet: 7 x 7 patches of 64 px, LayerNorm ResNet-50.

    python -m contrastive.main --config=configs/cpc_imagenet.py \
        --workdir=gs://bucket/cpc_imagenet --config.data.data_dir=gs://bucket/tfds \
        --distributed

From the paper: a 7 x 7 grid of 64 px patches every 32 px; the encoder's
BatchNorm replaced by LayerNorm and no projection head; colour dropping (two of
three channels) and horizontal flips per patch; predictions with contexts
from both directions (down and up here; the paper's ablation also names
horizontal predictions: ``--config.cpc.directions="('down','up','right','left')"``).
ResNet-50 reaches 63.8% linear top-1 in the paper, its ResNet-161 71.5%
(a ResNet-101 whose third stack has 46 blocks and 4096-d maps, not built here).

From the appendix's pseudo-code as the open re-implementation (CS294-158,
deepul_helper/tasks/cpc.py) reads it, NOT confirmed against the appendix: target
dimension 64, predictions scaled by 0.1, a 5-block masked context network of
256 channels (1 x 1, 1 x 3 within the row, 2 x 1 over the row above, 1 x 1),
offsets 3, 4 and 5 rows (steps_to_ignore=2, steps_to_predict=3), and all N x 49
patches of the batch as negatives.

This config's choices, NOT confirmed (the appendix with the grid's source crop,
the optimizer, batch, lr and epochs was not readable here): a 256 px random
resized crop of area (0.3, 1) of the image, each patch cropped to 70-100% of
its area and resized back, Adam at 4e-4 (betas 0.8, 0.999) with a cosine decay,
batch 512, 200 epochs. imagenet2012 must be prepared with TFDS beforehand.
"""

from contrastive.config import base_config
from contrastive.data import augment_config


def get_config(arg=None):
  del arg
  config = base_config()
  config.method = 'cpc'
  config.global_batch_size = 512
  config.num_epochs = 200.0
  config.log_every_steps = 100
  config.checkpoint_every_steps = 2500

  config.cpc.patch_size = 64
  config.cpc.patch_stride = 32
  config.cpc.target_dim = 64
  config.cpc.context_channels = 256
  config.cpc.context_blocks = 5
  config.cpc.directions = ('down', 'up')
  config.cpc.offsets = (3, 4, 5)
  config.cpc.prediction_scale = 0.1

  config.model.name = 'resnet50'
  config.model.stem = 'imagenet'
  config.model.norm = 'layer'

  config.data.source = 'tfds'
  config.data.name = 'imagenet2012'
  config.data.train_split = 'train'
  config.data.eval_split = 'validation'
  config.data.image_size = 256
  config.data.eval_crop_fraction = 0.875
  config.data.in_memory = False
  config.aug = augment_config.simclr_augment_config(blur_prob=0.0)
  config.aug.crop_area = (0.3, 1.0)
  config.aug.color_jitter_prob = 0.0
  config.aug.grayscale_prob = 0.0
  config.aug.mean = augment_config.IMAGENET_MEAN
  config.aug.std = augment_config.IMAGENET_STD

  config.optim.name = 'adamw'
  config.optim.base_lr = 4e-4
  config.optim.lr_scaling = 'none'
  config.optim.adam_betas = (0.8, 0.999)
  config.optim.warmup_epochs = 1.0
  config.optim.weight_decay = 0.0
  config.eval.batch_size = 256             # 49 patches of 64 px per image
  return config

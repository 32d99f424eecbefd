"""The augmentation sections of a config: SimCLR's, MoCo's and BYOL's defaults.

Each function returns one view's ``config.aug`` block, every field that
``augment.augment_batch`` (and the streaming pipeline's crop and flip) reads, so
experiment files start from a recipe and change what they need. The schema is
kept apart from the JAX code that applies it, so ``contrastive.config`` and the
experiment files import neither JAX nor TensorFlow.
"""

import ml_collections
from ml_collections import config_dict

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def simclr_augment_config(strength: float = 1.0,
                          blur_prob: float = 0.5) -> ml_collections.ConfigDict:
  """The SimCLR ImageNet augmentation block.

  ``strength`` is SimCLR's colour strength s: brightness, contrast and
  saturation are 0.8 s, hue is 0.2 s.
  """
  aug = ml_collections.ConfigDict()
  aug.crop_area = (0.08, 1.0)
  aug.crop_aspect = (3 / 4, 4 / 3)
  aug.flip_prob = 0.5
  aug.color_jitter_prob = 0.8
  aug.brightness = 0.8 * strength
  aug.contrast = 0.8 * strength
  aug.saturation = 0.8 * strength
  aug.hue = 0.2 * strength
  aug.grayscale_prob = 0.2
  aug.blur_prob = blur_prob
  aug.blur_sigma = (0.1, 2.0)
  aug.solarize_prob = 0.0
  # Typed placeholders, so a tuple can be set later from the command line.
  aug.mean = config_dict.placeholder(tuple)
  aug.std = config_dict.placeholder(tuple)
  return aug


def moco_augment_config(version: int) -> ml_collections.ConfigDict:
  """MoCo's augmentations; v1 is also the memory bank's (Wu et al. 2018).

  v1: crop area (0.2, 1), colour jitter 0.4 on all four always applied,
  grayscale 0.2, flip. v2: jitter (0.4, 0.4, 0.4, 0.1) with probability 0.8 and
  blur with probability 0.5 on top. Both normalise with ImageNet mean/std.
  """
  if version not in (1, 2):
    raise ValueError(f'MoCo augmentation version {version}; valid: 1, 2')
  aug = simclr_augment_config(blur_prob=0.0 if version == 1 else 0.5)
  aug.crop_area = (0.2, 1.0)
  aug.brightness = aug.contrast = aug.saturation = 0.4
  aug.hue = 0.4 if version == 1 else 0.1
  aug.color_jitter_prob = 1.0 if version == 1 else 0.8
  aug.mean = IMAGENET_MEAN
  aug.std = IMAGENET_STD
  return aug


def byol_augment_config(blur_prob: float, solarize_prob: float) -> ml_collections.ConfigDict:
  """One view of BYOL's augmentation (also MoCo v3's): crop area (0.08, 1), colour
  jitter (0.4, 0.4, 0.2, 0.1) with probability 0.8, grayscale 0.2, then blur and
  solarize with the view's probabilities (the paper: 1.0 / 0.1 and 0 / 0.2)."""
  aug = simclr_augment_config(blur_prob=blur_prob)
  aug.brightness, aug.contrast, aug.saturation, aug.hue = 0.4, 0.4, 0.2, 0.1
  aug.solarize_prob = solarize_prob
  return aug


def cpc_patch_augment_config() -> ml_collections.ConfigDict:
  """What each CPC patch gets on its own (``config.cpc.patch_aug``).

  CPC v2's patch augmentation (Henaff et al. 2020): colour dropping, two of the
  three channels dropped, here set to 0 (``channel_drop_prob``, every patch),
  and horizontal flips; then a crop of 70-100% of the patch's area resized back
  to the patch (this library's choice: the paper's further spatial augmentations
  are not specified in what was read). No normalisation here: the view's
  ``config.aug.mean`` / ``std`` apply to the patches, as they do in evaluation.
  """
  aug = simclr_augment_config(blur_prob=0.0)
  aug.crop_area = (0.7, 1.0)
  aug.crop_aspect = (3 / 4, 4 / 3)
  aug.flip_prob = 0.5
  aug.color_jitter_prob = 0.0
  aug.grayscale_prob = 0.0
  aug.channel_drop_prob = 1.0
  del aug['mean'], aug['std']
  return aug

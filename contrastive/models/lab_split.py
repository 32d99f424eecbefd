"""CMC's network: an image split into the L and ab channels of CIE Lab, one ResNet each.

:class:`LabSplitEncoder` takes RGB in [0, 1] (what the trainer's views and
evaluation preprocessing give when ``aug.mean`` is None), converts it to Lab on
the device (:func:`contrastive.data.augment.rgb_to_lab`) and normalises it as
``(Lab - LAB_OFFSET) / LAB_SCALE``: L / 50 - 1 spans [-1, 1], and a / 110, b / 110
keep the sRGB gamut inside (-1, 1) with every neutral grey at exactly 0, so the
ab encoder sees no colour where there is none. L (1 channel) goes through one
ResNet and ab (2 channels) through another, both of ``model.name`` at half
``model.width`` (stem included), so the pair has the channels of one ResNet of
the configured width (and half its weights); the features are the two
concatenated, L's first. It has the fields of a
:class:`~contrastive.models.resnet.ResNet`, so whatever clones or builds an
encoder (export, downstream evaluation) treats it as one.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from contrastive import models
from contrastive.data import augment
from contrastive.models.heads import ProjectionHead
from contrastive.models.resnet import ResNet

VIEWS = ('l', 'ab')           # parameter names of the views' networks, in feature order
LAB_OFFSET = (50.0, 0.0, 0.0)
LAB_SCALE = (50.0, 110.0, 110.0)


def lab_views(images):
  """RGB in [0, 1] ``[..., 3]`` -> normalised (L ``[..., 1]``, ab ``[..., 2]``)."""
  lab = augment.rgb_to_lab(images)
  lab = (lab - jnp.asarray(LAB_OFFSET)) / jnp.asarray(LAB_SCALE)
  return lab[..., :1], lab[..., 1:]


class LabSplitEncoder(nn.Module):
  """RGB -> Lab -> (ResNet of L, ResNet of ab) -> their features concatenated."""
  stage_sizes: Sequence[int]
  block: type[nn.Module]
  width: float = 1.0              # of the pair: each view's ResNet has width / 2
  stem: str = 'imagenet'
  bn_axis_name: str | None = None
  bn_momentum: float = 0.9
  dtype: Any = jnp.float32
  remat_stages: Sequence[int] = ()
  norm: str = 'batch'
  group_norm_groups: int = 32

  def view_encoder(self) -> ResNet:
    """Each view's ResNet, unbound (its input channels come from its input)."""
    return ResNet(stage_sizes=self.stage_sizes, block=self.block, width=self.width / 2,
                  stem=self.stem, bn_axis_name=self.bn_axis_name,
                  bn_momentum=self.bn_momentum, dtype=self.dtype,
                  remat_stages=self.remat_stages, norm=self.norm,
                  group_norm_groups=self.group_norm_groups, parent=None)

  @property
  def num_features(self) -> int:
    return len(VIEWS) * self.view_encoder().num_features

  @nn.compact
  def __call__(self, images, train: bool):
    encoder = self.view_encoder()
    return jnp.concatenate(
        [encoder.clone(parent=self, name=view)(x, train=train)
         for view, x in zip(VIEWS, lab_views(images))], axis=-1)


class ViewHeads(nn.Module):
  """One projection head per view, each on its view's half of the features.

  ``head`` describes every view's head (it is cloned per view, never called
  itself); returns the projections in the order of :data:`VIEWS`.
  """
  head: ProjectionHead

  @nn.compact
  def __call__(self, features, train: bool):
    halves = jnp.split(features, len(VIEWS), axis=-1)
    return tuple(self.head.clone(parent=self, name=view)(x, train=train)
                 for view, x in zip(VIEWS, halves))


def build_encoder(model: ml_collections.ConfigDict, axis_name: str = 'data') -> LabSplitEncoder:
  resnet = models.build_encoder(model, axis_name)
  if not isinstance(resnet, ResNet):
    raise ValueError(f'model.name={model.name!r}: CMC splits an image into two ResNets; '
                     'choose a ResNet (resnet10 ... resnet152).')
  return LabSplitEncoder(stage_sizes=resnet.stage_sizes, block=resnet.block,
                         width=resnet.width, stem=resnet.stem,
                         bn_axis_name=resnet.bn_axis_name, bn_momentum=resnet.bn_momentum,
                         dtype=resnet.dtype, remat_stages=resnet.remat_stages,
                         norm=resnet.norm, group_norm_groups=resnet.group_norm_groups)


def build_model(model: ml_collections.ConfigDict, head: ml_collections.ConfigDict,
                axis_name: str = 'data') -> models.EncoderWithHead:
  """The pair of encoders and of ``head`` projection heads; called like
  :class:`~contrastive.models.EncoderWithHead`, it returns ``(features,
  (L projection, ab projection))``."""
  half = ml_collections.ConfigDict(model.to_dict())
  half.width = model.width / 2
  view_head = models.build_model(half, head, axis_name).head   # sized for one view
  return models.EncoderWithHead(build_encoder(model, axis_name), ViewHeads(view_head))

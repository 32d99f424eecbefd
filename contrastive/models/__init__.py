"""Encoders and projection heads, built from the ``model`` and ``head`` configs.

Encoders are chosen by ``model.name``: the ResNets of :mod:`.resnet`
(``resnet10`` ... ``resnet152``: ``model.width``, ``stem``, ``norm``,
``remat_stages``) and the Vision Transformers of :mod:`.vit` (``vit_tiny``,
``vit_small``, ``vit_base``: the fields of ``model.vit``). ``model.precision``,
``model.bn`` (the heads' BatchNorm, and a BatchNorm ResNet's) and
``model.bn_momentum`` serve both.
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from contrastive.models import resnet
from contrastive.models import vit
from contrastive.models.heads import HiddenLayers, ProjectionHead

BN_MODES = ('global', 'local')
PRECISIONS = ('auto', 'float32', 'bfloat16')
ENCODERS = (*resnet.ARCHITECTURES, *vit.VARIANTS)


class EncoderWithHead(nn.Module):
  """Encoder features (what downstream tasks use) and their projection."""
  encoder: nn.Module
  head: ProjectionHead

  def __call__(self, images, train: bool):
    features = self.encoder(images, train=train)
    return features, self.head(features, train=train)


class EncoderWithHeadLayers(nn.Module):
  """The encoder, then the first hidden layers of its pretrained projection head;
  variables named as in the pretraining checkpoint (``encoder``, ``head``)."""
  encoder: nn.Module
  head: HiddenLayers

  @property
  def num_features(self) -> int:
    return self.head.hidden_dim

  def __call__(self, images, train: bool):
    return self.head(self.encoder(images, train=train), train=train)


class EncoderWithPredictor(nn.Module):
  """The online network of BYOL and MoCo v3: encoder, projector and predictor.

  Called like :class:`EncoderWithHead` it returns ``(features, projections)``,
  which is also what the EMA target (no predictor) computes;
  ``predict`` adds the predictor's output. Initialising through ``__call__``
  creates the predictor's parameters too.
  """
  encoder: nn.Module
  head: ProjectionHead
  predictor: ProjectionHead

  def __call__(self, images, train: bool):
    features = self.encoder(images, train=train)
    projections = self.head(features, train=train)
    if self.is_initializing():
      self.predictor(projections, train=train)
    return features, projections

  def predict(self, images, train: bool):
    features, projections = self(images, train=train)
    return features, projections, self.predictor(projections, train=train)


def bn_axis_name(model: ml_collections.ConfigDict, axis_name: str) -> str | None:
  """``model.bn='global'`` synchronises BatchNorm over ``axis_name``."""
  if model.bn not in BN_MODES:
    raise ValueError(f'model.bn={model.bn!r}; valid: {", ".join(BN_MODES)}')
  return axis_name if model.bn == 'global' else None


def compute_dtype(model: ml_collections.ConfigDict):
  """``model.precision``: 'bfloat16' or 'float32' compute; 'auto' is bfloat16 on
  GPU and TPU, float32 on CPU (where bfloat16 convolutions are emulated, slower).
  A pretraining record written before the field existed means float32."""
  precision = model.get('precision', 'float32')
  if precision not in PRECISIONS:
    raise ValueError(f'model.precision={precision!r}; valid: {", ".join(PRECISIONS)}')
  if precision == 'auto':
    precision = 'float32' if jax.default_backend() == 'cpu' else 'bfloat16'
  return jnp.dtype(precision)


def build_encoder(model: ml_collections.ConfigDict, axis_name: str | None = 'data',
                  feature_maps: Sequence[str] = ()) -> nn.Module:
  """The encoder ``model.name`` names. ``feature_maps``: a ResNet's stage outputs
  to return beside the pooled features (:data:`resnet.FEATURE_MAPS`)."""
  if model.name in vit.VARIANTS:
    if feature_maps:
      raise ValueError(f'model.name={model.name!r}: a ViT has no stage feature maps '
                       f'({", ".join(feature_maps)}); use a ResNet.')
    section = model.vit
    return vit.build_vit(
        model.name, patch_size=section.patch_size, depth=section.depth,
        hidden_dim=section.hidden_dim, num_heads=section.num_heads, mlp_dim=section.mlp_dim,
        pooling=section.pooling, position_embedding=section.position_embedding,
        frozen_patch_projection=section.frozen_patch_projection,
        drop_path_rate=section.drop_path_rate, remat=section.remat,
        dtype=compute_dtype(model))
  if model.name not in resnet.ARCHITECTURES:
    raise ValueError(f'model.name={model.name!r} is unknown; valid: {", ".join(ENCODERS)}')
  stage_sizes, block = resnet.ARCHITECTURES[model.name]
  return resnet.ResNet(stage_sizes=stage_sizes, block=block, width=model.width,
                       stem=model.stem, bn_axis_name=bn_axis_name(model, axis_name),
                       bn_momentum=model.bn_momentum, dtype=compute_dtype(model),
                       remat_stages=tuple(model.get('remat_stages', ())),
                       norm=model.get('norm', 'batch'),
                       group_norm_groups=model.get('group_norm_groups', 32),
                       feature_maps=tuple(feature_maps))


def build_model(model: ml_collections.ConfigDict, head: ml_collections.ConfigDict,
                axis_name: str = 'data') -> EncoderWithHead:
  encoder = build_encoder(model, axis_name)
  projection = ProjectionHead(
      num_layers=head.num_layers,
      hidden_dim=head.hidden_dim or encoder.num_features,
      out_dim=head.out_dim, use_bn=head.use_bn, output_bn=head.output_bn,
      bn_axis_name=bn_axis_name(model, axis_name), bn_momentum=model.bn_momentum,
      dtype=encoder.dtype)
  return EncoderWithHead(encoder, projection)


def build_model_with_predictor(model: ml_collections.ConfigDict,
                               head: ml_collections.ConfigDict,
                               predictor: ml_collections.ConfigDict,
                               axis_name: str = 'data') -> EncoderWithPredictor:
  """:func:`build_model` plus a predictor MLP from ``head.out_dim`` to itself."""
  network = build_model(model, head, axis_name)
  prediction = ProjectionHead(
      num_layers=predictor.num_layers, hidden_dim=predictor.hidden_dim,
      out_dim=head.out_dim, use_bn=True, output_bn=predictor.output_bn,
      bn_axis_name=bn_axis_name(model, axis_name), bn_momentum=model.bn_momentum,
      dtype=network.encoder.dtype)
  return EncoderWithPredictor(network.encoder, network.head, prediction)


def with_bn_axis(model, axis_name: str | None):
  """The same network with its BatchNorm statistics over ``axis_name`` (None: per
  device), an encoder on its own or with its heads; parts without a BatchNorm
  axis (a ViT) as they are."""
  if hasattr(model, 'bn_axis_name'):
    return model.clone(bn_axis_name=axis_name)
  parts = {name: getattr(model, name).clone(bn_axis_name=axis_name)
           for name in ('encoder', 'head', 'predictor')
           if hasattr(getattr(model, name, None), 'bn_axis_name')}
  return model.clone(**parts)

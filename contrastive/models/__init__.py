"""Encoders and projection heads, built from the ``model`` and ``head`` configs."""

import flax.linen as nn
import ml_collections

from contrastive.models.heads import ProjectionHead
from contrastive.models.resnet import ARCHITECTURES, ResNet

BN_MODES = ('global', 'local')


class EncoderWithHead(nn.Module):
  """Encoder features (what downstream tasks use) and their projection."""
  encoder: ResNet
  head: ProjectionHead

  def __call__(self, images, train: bool):
    features = self.encoder(images, train=train)
    return features, self.head(features, train=train)


def bn_axis_name(model: ml_collections.ConfigDict, axis_name: str) -> str | None:
  """``model.bn='global'`` synchronises BatchNorm over ``axis_name``."""
  if model.bn not in BN_MODES:
    raise ValueError(f'model.bn={model.bn!r}; valid: {", ".join(BN_MODES)}')
  return axis_name if model.bn == 'global' else None


def build_encoder(model: ml_collections.ConfigDict, axis_name: str = 'data') -> ResNet:
  if model.name not in ARCHITECTURES:
    raise ValueError(
        f'model.name={model.name!r} is unknown; valid: {", ".join(ARCHITECTURES)}')
  stage_sizes, block = ARCHITECTURES[model.name]
  return ResNet(stage_sizes=stage_sizes, block=block, width=model.width,
                stem=model.stem, bn_axis_name=bn_axis_name(model, axis_name),
                bn_momentum=model.bn_momentum)


def build_model(model: ml_collections.ConfigDict, head: ml_collections.ConfigDict,
                axis_name: str = 'data') -> EncoderWithHead:
  encoder = build_encoder(model, axis_name)
  projection = ProjectionHead(
      num_layers=head.num_layers,
      hidden_dim=head.hidden_dim or encoder.num_features,
      out_dim=head.out_dim, use_bn=head.use_bn,
      bn_axis_name=bn_axis_name(model, axis_name), bn_momentum=model.bn_momentum)
  return EncoderWithHead(encoder, projection)


def with_bn_axis(model: EncoderWithHead, axis_name: str | None) -> EncoderWithHead:
  """The same network with its BatchNorm statistics over ``axis_name`` (None: local)."""
  return model.clone(encoder=model.encoder.clone(bn_axis_name=axis_name),
                     head=model.head.clone(bn_axis_name=axis_name))


def encoder_features(model: EncoderWithHead, params, batch_stats, images):
  """What evaluation and export use: the encoder's pooled features, BN in inference."""
  features, _ = model.apply({'params': params, 'batch_stats': batch_stats},
                            images, train=False)
  return features

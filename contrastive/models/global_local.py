"""AMDIM's network: an encoder's global feature and two of its feature maps, embedded.

The encoder is a ResNet built with two feature-map taps (``local_maps``: the
finer map first, AMDIM's 7 x 7, then the coarser, its 5 x 5). The pooled
feature and each map position are embedded in one space of ``embed_dim``
(AMDIM's ``n_rkhs``) by :class:`ResidualEmbedding`, AMDIM's 1 x 1 residual MLP
(a 1 x 1 convolution is a dense layer on each position's channels). The
backbone for evaluation and export is the encoder alone: its pooled features.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp


class ResidualEmbedding(nn.Module):
  """``BN(W2 relu(BN(W1 x)) + W0 x)`` on the last axis of ``x``."""
  features: int
  bn_axis_name: str | None = None
  bn_momentum: float = 0.9
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    def norm(name):
      return nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                          epsilon=1e-5, axis_name=self.bn_axis_name if train else None,
                          dtype=self.dtype, name=name)

    h = nn.Dense(self.features, use_bias=False, dtype=self.dtype, name='hidden')(x)
    h = nn.relu(norm('hidden_bn')(h))
    h = nn.Dense(self.features, use_bias=False, dtype=self.dtype, name='out')(h)
    # No bias: the BatchNorm after the sum removes any shift.
    shortcut = nn.Dense(self.features, use_bias=False, dtype=self.dtype, name='shortcut')(x)
    return norm('out_bn')(h + shortcut).astype(jnp.float32)


class GlobalLocalNetwork(nn.Module):
  """``images -> (features, (global [B, D], fine [B, H, W, D], coarse [B, h, w, D]))``."""
  encoder: nn.Module                   # a ResNet with feature_maps == local_maps
  local_maps: Sequence[str]            # (fine, coarse) stage names
  embed_dim: int
  bn_axis_name: str | None = None
  bn_momentum: float = 0.9
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool):
    features, maps = self.encoder(images, train=train)
    embed = lambda name: ResidualEmbedding(self.embed_dim, self.bn_axis_name,
                                           self.bn_momentum, self.dtype, name=name)
    embedded = [embed('global_head')(features, train)]
    embedded += [embed(f'{name}_head')(maps[name], train) for name in self.local_maps]
    return features, tuple(embedded)

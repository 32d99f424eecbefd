"""Projection heads: linear (1 layer), SimCLR v1 MLP (2) and SimCLR v2 MLP (3).

``dtype`` is the compute dtype of the dense layers (see ``resnet``'s mixed
precision); every head returns float32, because the losses' normalisation, logits
and softmax must not run in bfloat16 (at T = 0.07 the positives would be lost).
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp


class ProjectionHead(nn.Module):
  """``num_layers`` dense layers; hidden ones Dense -> BN -> ReLU.

  As in the SimCLR reference, the last layer has no bias and, with ``use_bn`` and
  ``output_bn``, a BatchNorm without centring: the loss L2-normalises the output,
  so a shift would only waste capacity. BYOL's projector and predictor end in a
  plain Dense with bias (``output_bn=False``).
  """
  num_layers: int
  hidden_dim: int
  out_dim: int
  use_bn: bool = True
  output_bn: bool = True
  bn_axis_name: str | None = None
  bn_momentum: float = 0.9
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    if self.num_layers not in (1, 2, 3):
      raise ValueError(f'head.num_layers={self.num_layers}; valid: 1, 2, 3')

    def norm(**kwargs):
      return nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                          epsilon=1e-5, axis_name=self.bn_axis_name if train else None,
                          dtype=self.dtype, **kwargs)

    for _ in range(self.num_layers - 1):
      x = nn.Dense(self.hidden_dim, use_bias=not self.use_bn, dtype=self.dtype)(x)
      if self.use_bn:
        x = norm()(x)
      x = nn.relu(x)
    last_bn = self.use_bn and self.output_bn
    x = nn.Dense(self.out_dim, use_bias=not last_bn, dtype=self.dtype)(x)
    if last_bn:
      x = norm(use_bias=False)(x)
    return x.astype(jnp.float32)


class HiddenLayers(nn.Module):
  """The first ``num_layers`` hidden layers of a :class:`ProjectionHead`, under the
  head's own names (``Dense_i``, ``BatchNorm_i``), so that a pretrained head's
  variables fit them: SimCLR v2 fine-tunes from the head's first layer."""
  num_layers: int
  hidden_dim: int
  use_bn: bool = True
  bn_axis_name: str | None = None
  bn_momentum: float = 0.9
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    for _ in range(self.num_layers):
      x = nn.Dense(self.hidden_dim, use_bias=not self.use_bn, dtype=self.dtype)(x)
      if self.use_bn:
        x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                         epsilon=1e-5, axis_name=self.bn_axis_name if train else None,
                         dtype=self.dtype)(x)
      x = nn.relu(x)
    return x.astype(jnp.float32)


def hidden_layers(head: ProjectionHead, num_layers: int) -> HiddenLayers:
  """The first ``num_layers`` (1 to ``head.num_layers - 1``) hidden layers of ``head``."""
  return HiddenLayers(num_layers=num_layers, hidden_dim=head.hidden_dim,
                      use_bn=head.use_bn, bn_axis_name=head.bn_axis_name,
                      bn_momentum=head.bn_momentum, dtype=head.dtype)

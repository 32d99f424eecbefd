"""Projection heads: linear (1 layer), SimCLR v1 MLP (2) and SimCLR v2 MLP (3)."""

import flax.linen as nn


class ProjectionHead(nn.Module):
  """``num_layers`` dense layers; hidden ones Dense -> BN -> ReLU.

  As in the SimCLR reference, the last layer has no bias and, with ``use_bn``, a
  BatchNorm without centring: the loss L2-normalises the output, so a shift would
  only waste capacity.
  """
  num_layers: int
  hidden_dim: int
  out_dim: int
  use_bn: bool = True
  bn_axis_name: str | None = None
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, x, train: bool):
    if self.num_layers not in (1, 2, 3):
      raise ValueError(f'head.num_layers={self.num_layers}; valid: 1, 2, 3')

    def norm(**kwargs):
      return nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                          epsilon=1e-5, axis_name=self.bn_axis_name if train else None,
                          **kwargs)

    for _ in range(self.num_layers - 1):
      x = nn.Dense(self.hidden_dim, use_bias=not self.use_bn)(x)
      if self.use_bn:
        x = norm()(x)
      x = nn.relu(x)
    x = nn.Dense(self.out_dim, use_bias=not self.use_bn)(x)
    if self.use_bn:
      x = norm(use_bias=False)(x)
    return x

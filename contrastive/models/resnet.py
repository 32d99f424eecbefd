"""ResNet v1 encoders (He et al. 2016) with CIFAR and ImageNet stems.

BatchNorm is built by the caller-supplied ``bn_axis_name``: a mesh axis name makes
it cross-replica (statistics over the global batch, as SimCLR requires), ``None``
keeps it per-device.
"""

import functools
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

STEMS = ('imagenet', 'cifar')


class BasicBlock(nn.Module):
  """Two 3x3 convolutions; used by ResNet-18 and -34."""
  filters: int
  strides: int
  norm: type[nn.BatchNorm]
  expansion = 1

  @nn.compact
  def __call__(self, x):
    residual = x
    y = nn.Conv(self.filters, (3, 3), self.strides, padding=1, use_bias=False)(x)
    y = nn.relu(self.norm()(y))
    y = nn.Conv(self.filters, (3, 3), padding=1, use_bias=False)(y)
    # Zero-initialised last scale: each block starts as the identity, which
    # keeps large-batch LARS training stable in its first steps.
    y = self.norm(scale_init=nn.initializers.zeros)(y)
    if residual.shape != y.shape:
      residual = nn.Conv(self.filters, (1, 1), self.strides, use_bias=False)(x)
      residual = self.norm()(residual)
    return nn.relu(y + residual)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 -> 1x1 block with 4x expansion; ResNet-50 and deeper."""
  filters: int
  strides: int
  norm: type[nn.BatchNorm]
  expansion = 4

  @nn.compact
  def __call__(self, x):
    residual = x
    y = nn.Conv(self.filters, (1, 1), use_bias=False)(x)
    y = nn.relu(self.norm()(y))
    y = nn.Conv(self.filters, (3, 3), self.strides, padding=1, use_bias=False)(y)
    y = nn.relu(self.norm()(y))
    y = nn.Conv(self.filters * 4, (1, 1), use_bias=False)(y)
    y = self.norm(scale_init=nn.initializers.zeros)(y)
    if residual.shape != y.shape:
      residual = nn.Conv(self.filters * 4, (1, 1), self.strides, use_bias=False)(x)
      residual = self.norm()(residual)
    return nn.relu(y + residual)


class ResNet(nn.Module):
  """ResNet v1 trunk returning globally average-pooled features."""
  stage_sizes: Sequence[int]
  block: type[nn.Module]
  width: float = 1.0
  stem: str = 'imagenet'
  bn_axis_name: str | None = None
  bn_momentum: float = 0.9

  @property
  def num_features(self) -> int:
    return int(64 * self.width) * 8 * self.block.expansion

  @nn.compact
  def __call__(self, x, train: bool):
    norm = functools.partial(
        nn.BatchNorm, use_running_average=not train, momentum=self.bn_momentum,
        epsilon=1e-5, axis_name=self.bn_axis_name if train else None)
    base = int(64 * self.width)
    if self.stem == 'imagenet':
      x = nn.Conv(base, (7, 7), 2, padding=3, use_bias=False, name='stem_conv')(x)
      x = nn.relu(norm(name='stem_bn')(x))
      x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    elif self.stem == 'cifar':
      x = nn.Conv(base, (3, 3), 1, padding=1, use_bias=False, name='stem_conv')(x)
      x = nn.relu(norm(name='stem_bn')(x))
    else:
      raise ValueError(f'model.stem={self.stem!r}; valid: {", ".join(STEMS)}')
    for stage, num_blocks in enumerate(self.stage_sizes):
      for i in range(num_blocks):
        strides = 2 if stage > 0 and i == 0 else 1
        x = self.block(int(base * 2**stage), strides, norm,
                       name=f'stage{stage + 1}_block{i + 1}')(x)
    return jnp.mean(x, axis=(1, 2))


ARCHITECTURES = {
    'resnet10': ((1, 1, 1, 1), BasicBlock),
    'resnet18': ((2, 2, 2, 2), BasicBlock),
    'resnet34': ((3, 4, 6, 3), BasicBlock),
    'resnet50': ((3, 4, 6, 3), Bottleneck),
    'resnet101': ((3, 4, 23, 3), Bottleneck),
    'resnet152': ((3, 8, 36, 3), Bottleneck),
}

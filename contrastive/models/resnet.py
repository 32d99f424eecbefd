"""ResNet v1 encoders (He et al. 2016) with CIFAR and ImageNet stems.

BatchNorm is built by the caller-supplied ``bn_axis_name``: a mesh axis name makes
it cross-replica (statistics over the global batch, as SimCLR requires), ``None``
keeps it per-device.

Mixed precision: ``dtype`` is the compute dtype of convolutions and BatchNorm
outputs; parameters stay float32 and BatchNorm computes its statistics and
normalises in float32 (Flax promotes them), casting only its output. The pooled
features leave in float32, so heads and losses never see bfloat16 from here.
``remat_stages`` recomputes those stages' activations in the backward pass instead
of keeping them: memory for compute, per stage.
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

STEMS = ('imagenet', 'cifar')


class BasicBlock(nn.Module):
  """Two 3x3 convolutions; used by ResNet-18 and -34."""
  filters: int
  strides: int
  norm: type[nn.BatchNorm]
  conv: type[nn.Conv]
  expansion = 1

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(self.filters, (3, 3), self.strides, padding=1)(x)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.filters, (3, 3), padding=1)(y)
    # Zero-initialised last scale: each block starts as the identity, which
    # keeps large-batch LARS training stable in its first steps.
    y = self.norm(scale_init=nn.initializers.zeros)(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters, (1, 1), self.strides)(x)
      residual = self.norm()(residual)
    return nn.relu(y + residual)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 -> 1x1 block with 4x expansion; ResNet-50 and deeper."""
  filters: int
  strides: int
  norm: type[nn.BatchNorm]
  conv: type[nn.Conv]
  expansion = 4

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(self.filters, (1, 1))(x)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.filters, (3, 3), self.strides, padding=1)(y)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.filters * 4, (1, 1))(y)
    y = self.norm(scale_init=nn.initializers.zeros)(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters * 4, (1, 1), self.strides)(x)
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
  dtype: Any = jnp.float32
  remat_stages: Sequence[int] = ()     # 1-based stage numbers

  @property
  def num_features(self) -> int:
    return int(64 * self.width) * 8 * self.block.expansion

  @nn.compact
  def __call__(self, x, train: bool):
    norm = functools.partial(
        nn.BatchNorm, use_running_average=not train, momentum=self.bn_momentum,
        epsilon=1e-5, axis_name=self.bn_axis_name if train else None, dtype=self.dtype)
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
    base = int(64 * self.width)
    if self.stem == 'imagenet':
      x = conv(base, (7, 7), 2, padding=3, name='stem_conv')(x)
      x = nn.relu(norm(name='stem_bn')(x))
      x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    elif self.stem == 'cifar':
      x = conv(base, (3, 3), 1, padding=1, name='stem_conv')(x)
      x = nn.relu(norm(name='stem_bn')(x))
    else:
      raise ValueError(f'model.stem={self.stem!r}; valid: {", ".join(STEMS)}')
    for stage, num_blocks in enumerate(self.stage_sizes):
      # Same parameter names either way: remat changes the backward pass only.
      block = nn.remat(self.block) if stage + 1 in self.remat_stages else self.block
      for i in range(num_blocks):
        strides = 2 if stage > 0 and i == 0 else 1
        x = block(int(base * 2**stage), strides, norm, conv,
                  name=f'stage{stage + 1}_block{i + 1}')(x)
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


ARCHITECTURES = {
    'resnet10': ((1, 1, 1, 1), BasicBlock),
    'resnet18': ((2, 2, 2, 2), BasicBlock),
    'resnet34': ((3, 4, 6, 3), BasicBlock),
    'resnet50': ((3, 4, 6, 3), Bottleneck),
    'resnet101': ((3, 4, 23, 3), Bottleneck),
    'resnet152': ((3, 8, 36, 3), Bottleneck),
}

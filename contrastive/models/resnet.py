"""ResNet v1 encoders (He et al. 2016) with CIFAR and ImageNet stems.

BatchNorm is built by the caller-supplied ``bn_axis_name``: a mesh axis name makes
it cross-replica (statistics over the global batch, as SimCLR requires), ``None``
keeps it per-device.

Mixed precision: ``dtype`` is the compute dtype of convolutions and BatchNorm
outputs; parameters stay float32 and BatchNorm computes its statistics and
normalises in float32, casting only its output. The pooled features leave in
float32, so heads and losses never see bfloat16 from here.
``remat_stages`` recomputes those stages' activations in the backward pass instead
of keeping them: memory for compute, per stage.
"""

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

STEMS = ('imagenet', 'cifar')
_MOMENTS = 'batch_norm_moments'


def _normalize_batch(x, scale, bias, axis_name, epsilon, dtype):
  """(x normalised by its batch's statistics, as ``dtype``; the mean; the
  variance), in float32 as flax.linen.BatchNorm computes them: E[x] and E[x^2]
  in one cross-replica mean, the variance clipped at 0."""
  x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  axes = tuple(range(x.ndim - 1))
  moments = jnp.stack([x32.mean(axes), jax.lax.square(x32).mean(axes)])
  if axis_name is not None:
    moments = jax.lax.pmean(moments, axis_name)
  mean, mean_square = checkpoint_name(moments, _MOMENTS)
  var = jnp.maximum(0.0, mean_square - jax.lax.square(mean))
  return _normalize(x, mean, var, scale, bias, epsilon, dtype), mean, var


def _normalize(x, mean, var, scale, bias, epsilon, dtype):
  multiplier = jax.lax.rsqrt(var + epsilon)
  if scale is not None:
    multiplier = multiplier * scale
  y = (x - mean) * multiplier
  if bias is not None:
    y = y + bias
  return y.astype(dtype)


class BatchNorm(nn.Module):
  """flax.linen.BatchNorm's variables and arithmetic, but its backward pass keeps
  only the input (``dtype``, bfloat16 in mixed precision) and the per-channel
  moments. Autodiff of Flax's keeps two float32 copies of every activation (the
  input promoted for E[x^2], and x - mean), with which a bfloat16 ResNet-50 step
  keeps 1.9 times as much. The float32 arithmetic is recomputed from the input in
  the backward pass instead, elementwise; the cross-replica mean is not repeated."""
  use_running_average: bool
  axis_name: str | None = None
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Any = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  scale_init: Callable = nn.initializers.ones
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, x):
    features = (x.shape[-1],)
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, features, jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, features, jnp.float32)
    scale = (self.param('scale', self.scale_init, features, jnp.float32)
             if self.use_scale else None)
    bias = self.param('bias', self.bias_init, features, jnp.float32) if self.use_bias else None
    if self.use_running_average:
      return _normalize(x, ra_mean.value, ra_var.value, scale, bias, self.epsilon, self.dtype)
    normalize = jax.checkpoint(
        functools.partial(_normalize_batch,
                          axis_name=None if self.is_initializing() else self.axis_name,
                          epsilon=self.epsilon, dtype=self.dtype),
        policy=jax.checkpoint_policies.save_only_these_names(_MOMENTS))
    y, mean, var = normalize(x, scale, bias)
    if not self.is_initializing():
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return y


class BasicBlock(nn.Module):
  """Two 3x3 convolutions; used by ResNet-18 and -34."""
  filters: int
  strides: int
  norm: Callable[..., BatchNorm]
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
  norm: Callable[..., BatchNorm]
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
        BatchNorm, use_running_average=not train, momentum=self.bn_momentum,
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

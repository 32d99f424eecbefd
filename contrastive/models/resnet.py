"""ResNet v1 encoders (He et al. 2016) with CIFAR and ImageNet stems.

``norm`` picks each convolution's normalisation (``NORMS``):

- ``'batch'`` (default): BatchNorm built by the caller-supplied ``bn_axis_name``:
  a mesh axis name makes it cross-replica (statistics over the global batch, as
  SimCLR requires), ``None`` keeps it per-device.
- ``'group'``: GroupNorm (Wu and He 2018), ``group_norm_groups`` groups of
  channels normalised over each image's positions: independent of the batch, so
  it holds up where per-device batches are too small for BatchNorm's statistics.
- ``'layer'``: LayerNorm over the channels at each position, as CPC v2 (Henaff et
  al. 2019) replaces BatchNorm: no statistic is shared between the images, or
  patches, of a batch, which a contrastive loss could otherwise exploit.
- ``'none'``: no normalisation; the convolutions then have a bias.

Only ``'batch'`` keeps ``batch_stats`` or uses a mesh axis; the others treat each
image on its own, in training as in evaluation. Every norm with a scale starts
each residual block's last one at zero. The three normalisations keep, for their
backward pass, only their input and their (small) statistics.

Mixed precision: ``dtype`` is the compute dtype of convolutions and normalisation
outputs; parameters stay float32 and the normalisations compute their statistics
and normalise in float32, casting only their output. The pooled features leave in
float32, so heads and losses never see bfloat16 from here.
``remat_stages`` recomputes those stages' activations in the backward pass instead
of keeping them: memory for compute, per stage.
``feature_maps`` names intermediate outputs (``FEATURE_MAPS``) to return beside
the pooled features, as float32 ``[B, H, W, C]``.
"""

import functools
import numbers
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

STEMS = ('imagenet', 'cifar')
NORMS = ('batch', 'group', 'layer', 'none')
FEATURE_MAPS = ('stem', 'stage1', 'stage2', 'stage3', 'stage4')
_MOMENTS = 'batch_norm_moments'     # GroupNorm's and LayerNorm's moments too


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


def _normalize_example(x, scale, bias, num_groups, spatial, epsilon, dtype):
  """x normalised by each example's own statistics, as ``dtype``: over each group
  of channels and all positions (``spatial``, flax.linen.GroupNorm) or over the
  channels at each position (``num_groups=1``, not ``spatial``: flax.linen.LayerNorm
  with its default axes), in float32 as Flax computes them: E[x] and E[x^2], the
  variance clipped at 0."""
  x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  channels = x.shape[-1]
  grouped = x32.reshape(x.shape[:-1] + (num_groups, channels // num_groups))
  axes = (tuple(range(1, x.ndim - 1)) if spatial else ()) + (x.ndim,)
  moments = jnp.stack([grouped.mean(axes), jax.lax.square(grouped).mean(axes)])
  mean, mean_square = checkpoint_name(moments, _MOMENTS)
  var = jnp.maximum(0.0, mean_square - jax.lax.square(mean))
  # [B, groups] -> [B, 1, 1, C] (spatial), or [B, H, W, 1] as it is.
  if num_groups > 1:
    mean, var = (jnp.repeat(v, channels // num_groups, axis=-1) for v in (mean, var))
  if spatial:
    mean, var = (jnp.expand_dims(v, tuple(range(1, x.ndim - 1))) for v in (mean, var))
  return _normalize(x, mean, var, scale, bias, epsilon, dtype)


def _scale_and_bias(module, features):
  """A normalisation's float32 scale and bias parameters (None where it has none)."""
  scale = (module.param('scale', module.scale_init, features, jnp.float32)
           if module.use_scale else None)
  bias = (module.param('bias', module.bias_init, features, jnp.float32)
          if module.use_bias else None)
  return scale, bias


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
    scale, bias = _scale_and_bias(self, features)
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


def _example_norm(module, x, num_groups, spatial):
  """``module``'s scale and bias (Flax's names) applied by ``_normalize_example``,
  whose backward pass keeps only the input and the statistics."""
  scale, bias = _scale_and_bias(module, (x.shape[-1],))
  normalize = jax.checkpoint(
      functools.partial(_normalize_example, num_groups=num_groups, spatial=spatial,
                        epsilon=module.epsilon, dtype=module.dtype),
      policy=jax.checkpoint_policies.save_only_these_names(_MOMENTS))
  return normalize(x, scale, bias)


class GroupNorm(nn.Module):
  """flax.linen.GroupNorm's variables and arithmetic (statistics of each image's
  groups of channels over all its positions), keeping for the backward pass only
  the input and the per-group moments, as ``BatchNorm`` does."""
  num_groups: int = 32
  epsilon: float = 1e-5
  dtype: Any = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  scale_init: Callable = nn.initializers.ones
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, x):
    if self.num_groups < 1 or x.shape[-1] % self.num_groups:
      raise ValueError(f'GroupNorm: {self.num_groups} groups do not divide '
                       f'{x.shape[-1]} channels')
    return _example_norm(self, x, self.num_groups, spatial=True)


class LayerNorm(nn.Module):
  """flax.linen.LayerNorm's variables and arithmetic over the last axis only (the
  channels at each position), keeping for the backward pass only the input and the
  per-position moments."""
  epsilon: float = 1e-5
  dtype: Any = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  scale_init: Callable = nn.initializers.ones
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, x):
    return _example_norm(self, x, 1, spatial=False)


def _no_norm(**unused):
  """The ``norm`` factory of ``'none'``: each layer's normalisation is the identity."""
  del unused
  return lambda x: x


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


class BasicBlock(nn.Module):
  """Two 3x3 convolutions; used by ResNet-18 and -34."""
  filters: int
  strides: int
  norm: Callable[..., Callable]     # BatchNorm, GroupNorm, LayerNorm or _no_norm
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
  norm: Callable[..., Callable]
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
  """ResNet v1 trunk returning globally average-pooled features, and with
  ``feature_maps`` a dict of those intermediate outputs beside them."""
  stage_sizes: Sequence[int]
  block: type[nn.Module]
  width: float = 1.0
  stem: str = 'imagenet'
  bn_axis_name: str | None = None
  bn_momentum: float = 0.9
  dtype: Any = jnp.float32
  remat_stages: Sequence[int] = ()     # 1-based stage numbers
  norm: str = 'batch'                  # one of NORMS
  group_norm_groups: int = 32          # norm='group' only
  feature_maps: Sequence[str] = ()     # names from FEATURE_MAPS

  @property
  def num_features(self) -> int:
    return int(64 * self.width) * 8 * self.block.expansion

  def _check_group_norm_groups(self, base: int):
    """Every layer's channels are a power-of-two multiple of the stem's ``base``
    (times 4 in bottlenecks): ``groups`` divides them all iff it divides ``base``."""
    groups = self.group_norm_groups
    if isinstance(groups, numbers.Integral) and groups >= 1 and base % groups == 0:
      return
    channels = sorted({base * 2**s * k for s in range(len(self.stage_sizes))
                       for k in {1, self.block.expansion}} | {base})
    raise ValueError(
        f'model.group_norm_groups={groups!r} does not divide the {base} channels of '
        f'stem_gn (model.width={self.width} gives layers of '
        f'{", ".join(map(str, channels))} channels); use a divisor of {base}: '
        f'{", ".join(map(str, _divisors(base)))}')

  @nn.compact
  def __call__(self, x, train: bool):
    if self.norm not in NORMS:
      raise ValueError(f'model.norm={self.norm!r}; valid: {", ".join(NORMS)}')
    wanted = tuple(self.feature_maps)
    available = ('stem',) + tuple(f'stage{s + 1}' for s in range(len(self.stage_sizes)))
    unknown = [name for name in wanted if name not in available]
    if unknown:
      raise ValueError(f'feature_maps: unknown {", ".join(map(repr, unknown))}; '
                       f'valid: {", ".join(available)}')
    maps = {}

    def keep(name, x):
      if name in wanted:
        maps[name] = x.astype(jnp.float32)

    base = int(64 * self.width)
    if self.norm == 'batch':
      norm = functools.partial(
          BatchNorm, use_running_average=not train, momentum=self.bn_momentum,
          epsilon=1e-5, axis_name=self.bn_axis_name if train else None, dtype=self.dtype)
      stem_norm = 'stem_bn'
    elif self.norm == 'group':
      self._check_group_norm_groups(base)
      norm = functools.partial(GroupNorm, num_groups=self.group_norm_groups, dtype=self.dtype)
      stem_norm = 'stem_gn'
    elif self.norm == 'layer':
      norm = functools.partial(LayerNorm, dtype=self.dtype)
      stem_norm = 'stem_ln'
    else:
      norm, stem_norm = _no_norm, None
    conv = functools.partial(nn.Conv, use_bias=self.norm == 'none', dtype=self.dtype)
    if self.stem == 'imagenet':
      x = conv(base, (7, 7), 2, padding=3, name='stem_conv')(x)
      x = nn.relu(norm(name=stem_norm)(x))
      x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    elif self.stem == 'cifar':
      x = conv(base, (3, 3), 1, padding=1, name='stem_conv')(x)
      x = nn.relu(norm(name=stem_norm)(x))
    else:
      raise ValueError(f'model.stem={self.stem!r}; valid: {", ".join(STEMS)}')
    keep('stem', x)
    for stage, num_blocks in enumerate(self.stage_sizes):
      # Same parameter names either way: remat changes the backward pass only.
      block = nn.remat(self.block) if stage + 1 in self.remat_stages else self.block
      for i in range(num_blocks):
        strides = 2 if stage > 0 and i == 0 else 1
        x = block(int(base * 2**stage), strides, norm, conv,
                  name=f'stage{stage + 1}_block{i + 1}')(x)
      keep(f'stage{stage + 1}', x)
    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    return (pooled, maps) if wanted else pooled


ARCHITECTURES = {
    'resnet10': ((1, 1, 1, 1), BasicBlock),
    'resnet18': ((2, 2, 2, 2), BasicBlock),
    'resnet34': ((3, 4, 6, 3), BasicBlock),
    'resnet50': ((3, 4, 6, 3), Bottleneck),
    'resnet101': ((3, 4, 23, 3), Bottleneck),
    'resnet152': ((3, 8, 36, 3), Bottleneck),
}

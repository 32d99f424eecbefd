"""Vision Transformer encoders (Dosovitskiy et al. 2021, "An Image is Worth 16x16
Words"), with the options self-supervised ViT recipes rely on.

The network is the one timm's ``VisionTransformer`` builds (pre-norm blocks,
LayerNorm epsilon 1e-6, exact GELU, qkv with bias), so that
:mod:`contrastive.formats.timm` can export its weights and timm computes the same
features:

* ``pooling='token'``: a learned class token is prepended and its output after
  the final LayerNorm is the feature (the paper; timm's ``global_pool='token'``).
  ``'gap'``: no class token; the mean of the patch tokens, then a LayerNorm
  (timm's ``global_pool='avg', class_token=False``, whose ``fc_norm`` normalises
  after pooling, not before).
* ``position_embedding='learned'``: a parameter (the paper). ``'sincos'``: the
  fixed 2-D sin-cos table of MoCo v3 (Chen, Xie and He 2021) and MAE (He et al.
  2022), a constant rather than a parameter, zeros at the class token.
* ``frozen_patch_projection``: MoCo v3's random patch projection, never trained,
  with which the paper finds ViT pretraining more stable (no sudden dips in
  accuracy). It lives in the ``'frozen'`` collection, not ``'params'``: model
  state, which neither the optimizer nor weight decay touches.
* ``drop_path_rate``: stochastic depth (Huang et al. 2016) per sample, its rate
  rising linearly from 0 at the first block to ``drop_path_rate`` at the last,
  as in DeiT (Touvron et al. 2021) and timm. It draws from the ``'dropout'`` rng
  only in training and only when the rate is positive.
* ``remat``: each block's activations recomputed in the backward pass instead of
  kept (memory for compute); parameter names are the same either way.

Initialisation follows MoCo v3: xavier-uniform dense kernels, with q, k and v
each xavier-uniform as its own square matrix; the patch projection uniform in
+-sqrt(6 / (patch_size^2 * channels + hidden_dim)); zero biases; class token
normal with std 1e-6; a learned position embedding normal with std 0.02.

Mixed precision: ``dtype`` is the compute dtype of the projections, the residual
stream and the attention; parameters stay float32, LayerNorm computes its
statistics in float32, the attention logits accumulate and go through softmax in
float32, and the final LayerNorm and the pooled features are float32, so heads
and losses never see bfloat16 from here.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

POOLINGS = ('token', 'gap')
POSITION_EMBEDDINGS = ('learned', 'sincos')

# name: (hidden_dim, depth, num_heads, mlp_dim), as DeiT and timm define them.
# MoCo v3's ViT-S has 12 heads: build_vit('vit_small', num_heads=12).
VARIANTS = {
    'vit_tiny': (192, 12, 3, 768),
    'vit_small': (384, 12, 6, 1536),
    'vit_base': (768, 12, 12, 3072),
}

_LN_EPSILON = 1e-6       # timm's and big_vision's; flax's default is 1e-5


def sincos_position_embedding(grid: tuple[int, int], dim: int) -> np.ndarray:
  """The ``[rows * cols, dim]`` float32 table of MoCo v3 and MAE, row-major.

  Each patch's row and column each get a quarter of the channels as sines and a
  quarter as cosines, at frequencies 10000^(-i / (dim / 4)): a patch's table row
  is ``[sin(row w), cos(row w), sin(col w), cos(col w)]``. That is MoCo v3's
  table on square grids (MAE's has the row and column halves swapped); the
  dot product of two patches' rows depends only on their offset.
  """
  if dim % 4:
    raise ValueError(f'sin-cos position embedding needs hidden_dim divisible by 4, got {dim}')
  quarter = dim // 4
  omega = 1.0 / np.float32(10000.0) ** (np.arange(quarter, dtype=np.float32) / quarter)
  rows, cols = np.meshgrid(np.arange(grid[0], dtype=np.float32),
                           np.arange(grid[1], dtype=np.float32), indexing='ij')
  row = rows.reshape(-1, 1) * omega
  col = cols.reshape(-1, 1) * omega
  return np.concatenate([np.sin(row), np.cos(row), np.sin(col), np.cos(col)],
                        axis=1).astype(np.float32)


def _qkv_init(key, shape, dtype=jnp.float32):
  """xavier-uniform for each of q, k and v as its own ``[d, d]`` matrix (MoCo v3),
  not for the ``[d, 3d]`` kernel as a whole, whose bound would be sqrt(2) smaller."""
  fan_in, fan_out = shape
  per_slab = nn.initializers.xavier_uniform(in_axis=0, out_axis=2, batch_axis=1)
  return per_slab(key, (fan_in, 3, fan_out // 3), dtype).reshape(shape)


# MoCo v3's patch projection init: xavier-uniform of the [p * p * channels,
# hidden_dim] matrix the projection is (not torch's conv fans, which also multiply
# the output fan by p * p).
_patch_init = nn.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=3)
_dense = nn.initializers.xavier_uniform()


class PatchEmbedding(nn.Module):
  """Non-overlapping ``patch_size`` patches, each projected to ``hidden_dim``.

  ``frozen``: kernel and bias in the ``'frozen'`` collection, drawn once at init
  and never updated (MoCo v3); otherwise in ``'params'``. Same names either way.
  """
  patch_size: int
  hidden_dim: int
  frozen: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images):
    p = self.patch_size
    shape = (p, p, images.shape[-1], self.hidden_dim)       # HWIO, as nn.Conv
    if self.frozen:
      kernel = self.variable(
          'frozen', 'kernel', lambda: _patch_init(self.make_rng('params'), shape)).value
      bias = self.variable('frozen', 'bias', jnp.zeros, (self.hidden_dim,), jnp.float32).value
      kernel, bias = jax.lax.stop_gradient((kernel, bias))
    else:
      kernel = self.param('kernel', _patch_init, shape)
      bias = self.param('bias', nn.initializers.zeros, (self.hidden_dim,))
    x = jax.lax.conv_general_dilated(
        images.astype(self.dtype), kernel.astype(self.dtype), (p, p), 'VALID',
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return x + bias.astype(self.dtype)


class SelfAttention(nn.Module):
  """Multi-head self-attention; one qkv projection laid out ``[q | k | v]``, each
  head-major, as timm's, so its kernel exports by a transpose."""
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    batch, length, dim = x.shape
    if dim % self.num_heads:
      raise ValueError(f'hidden_dim={dim} is not divisible by num_heads={self.num_heads}')
    head_dim = dim // self.num_heads
    qkv = nn.Dense(3 * dim, kernel_init=_qkv_init, dtype=self.dtype, name='qkv')(x)
    q, k, v = jnp.moveaxis(qkv.reshape(batch, length, 3, self.num_heads, head_dim), 2, 0)
    # Logits accumulate in float32 and are scaled there: bfloat16 logits of a
    # sharp softmax would round its largest weights.
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits * head_dim**-0.5, axis=-1).astype(self.dtype)
    y = jnp.einsum('bhqk,bkhd->bqhd', weights, v).reshape(batch, length, dim)
    return nn.Dense(dim, kernel_init=_dense, dtype=self.dtype, name='proj')(y)


class MlpBlock(nn.Module):
  mlp_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = nn.Dense(self.mlp_dim, kernel_init=_dense, dtype=self.dtype, name='fc1')(x)
    y = nn.gelu(y, approximate=False)      # exact, as timm's nn.GELU
    return nn.Dense(x.shape[-1], kernel_init=_dense, dtype=self.dtype, name='fc2')(y)


class EncoderBlock(nn.Module):
  """Pre-norm transformer block: x + attn(norm1(x)), then + mlp(norm2(x)); each
  branch dropped per sample (its own draw) with ``drop_path_rate`` in training."""
  num_heads: int
  mlp_dim: int
  drop_path_rate: float = 0.0
  deterministic: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    norm = lambda name: nn.LayerNorm(epsilon=_LN_EPSILON, use_fast_variance=False,
                                     dtype=self.dtype, name=name)
    # Broadcast over tokens and channels: one keep/drop per sample, the kept ones
    # scaled by 1 / (1 - rate), as timm's DropPath. No rng is drawn when the rate
    # is 0 or deterministic.
    drop_path = lambda: nn.Dropout(self.drop_path_rate, broadcast_dims=(1, 2),
                                   deterministic=self.deterministic)
    y = SelfAttention(self.num_heads, dtype=self.dtype, name='attn')(norm('norm1')(x))
    x = x + drop_path()(y)
    y = MlpBlock(self.mlp_dim, dtype=self.dtype, name='mlp')(norm('norm2')(x))
    return x + drop_path()(y)


class VisionTransformer(nn.Module):
  """ViT trunk: NHWC float images in, pooled float32 features ``[B, hidden_dim]`` out.

  The image size is any multiple of ``patch_size``; a learned position embedding
  is sized from the images given at init, and later calls must use that size.
  """
  patch_size: int
  hidden_dim: int
  depth: int
  num_heads: int
  mlp_dim: int
  pooling: str = 'token'
  position_embedding: str = 'learned'
  frozen_patch_projection: bool = False
  drop_path_rate: float = 0.0
  remat: bool = False
  dtype: Any = jnp.float32

  @property
  def num_features(self) -> int:
    return self.hidden_dim

  @property
  def drop_path_rates(self) -> list[float]:
    """Per block: 0 at the first, ``drop_path_rate`` at the last (DeiT, timm)."""
    return [float(r) for r in np.linspace(0.0, self.drop_path_rate, self.depth)]

  @nn.compact
  def __call__(self, images, train: bool):
    if self.pooling not in POOLINGS:
      raise ValueError(f'pooling={self.pooling!r}; valid: {", ".join(POOLINGS)}')
    if self.position_embedding not in POSITION_EMBEDDINGS:
      raise ValueError(f'position_embedding={self.position_embedding!r}; '
                       f'valid: {", ".join(POSITION_EMBEDDINGS)}')
    height, width = images.shape[1:3]
    if height % self.patch_size or width % self.patch_size:
      raise ValueError(f'image size {height}x{width} is not a multiple of '
                       f'patch_size={self.patch_size}')
    x = PatchEmbedding(self.patch_size, self.hidden_dim, self.frozen_patch_projection,
                       dtype=self.dtype, name='patch_embed')(images)
    grid = x.shape[1:3]
    x = x.reshape(x.shape[0], -1, self.hidden_dim)           # row-major, as timm
    prefix = 1 if self.pooling == 'token' else 0
    if prefix:
      cls = self.param('cls_token', nn.initializers.normal(1e-6), (1, 1, self.hidden_dim))
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, self.hidden_dim)),
                           x], axis=1)
    if self.position_embedding == 'learned':
      # timm's trunc_normal_(std=0.02) truncates at +-2, i.e. +-100 std: a normal.
      position = self.param('pos_embed', nn.initializers.normal(0.02),
                            (1, x.shape[1], self.hidden_dim))
    else:
      position = self.position_table(grid)[None]
    x = (x + position).astype(self.dtype)

    block = nn.remat(EncoderBlock) if self.remat else EncoderBlock
    for i, rate in enumerate(self.drop_path_rates):
      x = block(self.num_heads, self.mlp_dim, drop_path_rate=rate,
                deterministic=not train, dtype=self.dtype, name=f'block{i}')(x)

    final_norm = lambda name: nn.LayerNorm(epsilon=_LN_EPSILON, use_fast_variance=False,
                                           dtype=jnp.float32, name=name)
    if self.pooling == 'token':
      return final_norm('norm')(x[:, 0])      # per token: the others' norm is unused
    return final_norm('fc_norm')(jnp.mean(x.astype(jnp.float32), axis=1))

  def position_table(self, grid: tuple[int, int]) -> np.ndarray:
    """The fixed sin-cos embedding for a ``grid`` of patches, ``[tokens, hidden_dim]``,
    with a zero row first for the class token when there is one."""
    table = sincos_position_embedding(tuple(grid), self.hidden_dim)
    if self.pooling == 'token':
      table = np.concatenate([np.zeros((1, self.hidden_dim), np.float32), table])
    return table


def build_vit(name: str, *, patch_size: int = 16, depth: int = 0, hidden_dim: int = 0,
              num_heads: int = 0, mlp_dim: int = 0, **fields) -> VisionTransformer:
  """A :data:`VARIANTS` ViT; a size argument of 0 keeps the variant's (tests and
  ablations shrink one dimension at a time)."""
  if name not in VARIANTS:
    raise ValueError(f'ViT variant {name!r} is unknown; valid: {", ".join(VARIANTS)}')
  default_hidden, default_depth, default_heads, default_mlp = VARIANTS[name]
  return VisionTransformer(patch_size=patch_size, hidden_dim=hidden_dim or default_hidden,
                           depth=depth or default_depth, num_heads=num_heads or default_heads,
                           mlp_dim=mlp_dim or default_mlp, **fields)

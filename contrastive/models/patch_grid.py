"""CPC v2's networks: an encoder run on every patch of a grid, and the masked context.

An image is cut into a ``G`` x ``G`` grid of overlapping patches
(:func:`contrastive.data.augment.cut_grid`); the encoder (a ResNet, with LayerNorm
in CPC v2) embeds each patch on its own, its pooled feature the patch's latent
``z[r, c]``. :class:`PatchGridEncoder` is the backbone that evaluation, exports
and downstream tasks use: the latents of the whole grid, averaged.

:class:`CPCNetwork` adds what pretraining needs. A linear map of each latent is
its target; per prediction direction a :class:`ContextNetwork` over the grid
turned so that the direction points down (:func:`orient`) gives each position a
context that has seen only its own row and the rows above, and one linear map
per offset ``k`` predicts, from the context at row ``r``, the target at row
``r + k``. The masking is in the convolutions: a 1 x 3 convolution within the
row, then a 2 x 1 one over the row above and the row itself (padded at the top),
so that no stack of blocks reaches a row below.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from contrastive.data import augment

DIRECTIONS = ('down', 'up', 'right', 'left')   # where the predicted rows lie


def orient(grid, direction: str):
  """``grid`` ([B, G, G, ...], or a numpy [G, G]) turned so that ``direction``
  points down its rows: 'up' flips the rows, 'right' swaps rows and columns,
  'left' does both. Its own inverse for 'down' and 'up' only."""
  batched = not isinstance(grid, np.ndarray)
  rows, cols = (1, 2) if batched else (0, 1)
  flip = (lambda x: jnp.flip(x, rows)) if batched else (lambda x: np.flip(x, rows))
  swap = ((lambda x: jnp.swapaxes(x, rows, cols)) if batched
          else (lambda x: np.swapaxes(x, rows, cols)))
  if direction == 'down':
    return grid
  if direction == 'up':
    return flip(grid)
  if direction == 'right':
    return swap(grid)
  if direction == 'left':
    return flip(swap(grid))
  raise ValueError(f'prediction direction {direction!r}; valid: {", ".join(DIRECTIONS)}')


class PatchGridEncoder(nn.Module):
  """The encoder's features of every patch of the image's grid, averaged."""
  encoder: nn.Module
  patch_size: int
  stride: int

  @property
  def num_features(self) -> int:
    return self.encoder.num_features

  def latents(self, images, train: bool):
    """``[B, S, S, 3]`` images or ``[B, G * G, p, p, 3]`` patches -> ``[B, G, G, C]``."""
    patches = images if images.ndim == 5 else augment.cut_grid(
        images, self.patch_size, self.stride)
    batch, count = patches.shape[:2]
    side = int(round(count ** 0.5))
    features = self.encoder(patches.reshape(batch * count, *patches.shape[2:]), train=train)
    return features.reshape(batch, side, side, -1)

  def __call__(self, images, train: bool):
    return jnp.mean(self.latents(images, train), axis=(1, 2))


class ContextBlock(nn.Module):
  """One residual block of the context network; position ``[r, c]`` of its output
  sees rows ``r - 1`` and ``r`` of its input (columns ``c - 1`` to ``c + 1``)."""
  channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = lambda features, kernel, padding, name: nn.Conv(
        features, kernel, padding=padding, dtype=self.dtype, name=name)
    h = nn.relu(conv(self.channels, (1, 1), 'VALID', 'reduce')(x))
    h = nn.relu(conv(self.channels, (1, 3), ((0, 0), (1, 1)), 'along_row')(h))
    h = jnp.pad(h, ((0, 0), (1, 0), (0, 0), (0, 0)))        # a row of zeros above
    h = nn.relu(conv(self.channels, (2, 1), 'VALID', 'from_above')(h))
    return x + conv(x.shape[-1], (1, 1), 'VALID', 'expand')(h)


class ContextNetwork(nn.Module):
  """Masked residual blocks over the grid of latents: context ``[r, c]`` depends
  on rows ``<= r`` only (PixelCNN-style)."""
  channels: int
  num_blocks: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, latents):
    x = latents
    for i in range(self.num_blocks):
      x = ContextBlock(self.channels, self.dtype, name=f'block{i + 1}')(x)
    return nn.relu(x).astype(jnp.float32)


class CPCNetwork(nn.Module):
  """Patch encoder, targets, and each direction's context and predictions.

  Called on images ``[B, S, S, 3]`` (cut into the grid here, as at
  initialisation) or on augmented patches ``[B, G * G, p, p, 3]``; returns
  ``(features, (targets, predictions))``: the grid-averaged latents ``[B, C]``,
  the targets ``[B, G, G, T]`` in grid order, and per direction the
  predictions ``[B, G, G, K, T]`` in that direction's :func:`orient` order,
  ``[..., j, :]`` for ``offsets[j]`` rows further along it.
  """
  encoder: nn.Module
  patch_size: int
  stride: int
  target_dim: int
  context_channels: int
  context_blocks: int
  directions: Sequence[str]
  offsets: Sequence[int]
  dtype: Any = jnp.float32

  def grid_encoder(self) -> PatchGridEncoder:
    return PatchGridEncoder(self.encoder, self.patch_size, self.stride)

  @nn.compact
  def __call__(self, images, train: bool):
    patches = images if images.ndim == 5 else augment.cut_grid(
        images, self.patch_size, self.stride)
    batch, count = patches.shape[:2]
    side = int(round(count ** 0.5))
    features = self.encoder(patches.reshape(batch * count, *patches.shape[2:]), train=train)
    latents = features.reshape(batch, side, side, -1)
    dense = lambda name, bias=True: nn.Dense(self.target_dim, use_bias=bias,
                                             dtype=self.dtype, name=name)
    # No bias: it would add the same q . b to every logit of a prediction's
    # softmax, which nothing can learn (under Adam it would drift on rounding).
    targets = dense('target', bias=False)(latents).astype(jnp.float32)
    predictions = {}
    for direction in self.directions:
      context = ContextNetwork(self.context_channels, self.context_blocks, self.dtype,
                               name=f'context_{direction}')(orient(latents, direction))
      predictions[direction] = jnp.stack(
          [dense(f'predict_{direction}_{k}')(context).astype(jnp.float32)
           for k in self.offsets], axis=3)
    return jnp.mean(latents, axis=(1, 2)), (targets, predictions)

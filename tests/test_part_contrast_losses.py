"""CPC v2 and AMDIM: their losses on 8 devices against float64 numpy references,
the context network's mask, and the 8-device losses against the 1-device ones.

The networks are tiny stand-ins (a Dense per patch for CPC's encoder, Dense
layers for AMDIM's global-local network), with no BatchNorm and so no model
state: what is under test is the context network, the bookkeeping of the
predictions and the sharded InfoNCE, recomputed in numpy from the parameters.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from contrastive.methods import Batch, Context, RunInfo, amdim, cpc
from contrastive.models import patch_grid
from tests import tolerances

DEVICES = 8
BATCH = 16                 # the global batch: 2 images a device
RUN = RunInfo(num_examples=BATCH, num_devices=DEVICES, total_steps=1)


def _mesh():
  return jax.make_mesh((DEVICES,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))


def _logsumexp(x, axis=-1):
  top = np.max(x, axis=axis, keepdims=True)
  return np.squeeze(top, axis) + np.log(np.sum(np.exp(x - top), axis=axis))


def _random_params(module, inputs, rng, gain=1.0):
  """``module``'s parameters with numpy values: kernels He-scaled times ``gain``,
  biases small; shapes from ``eval_shape``, so nothing is compiled."""
  shapes = jax.eval_shape(functools.partial(module.init, train=False), jax.random.key(0),
                          inputs)['params']

  def value(path, leaf):
    if path[-1].key == 'kernel':
      return rng.normal(0, gain * np.sqrt(2 / np.prod(leaf.shape[:-1])), leaf.shape)
    return rng.normal(0, 0.1, leaf.shape)

  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: value(path, leaf).astype(np.float32), shapes)


def _f64(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


# --------------------------------------------------------------------------- CPC

SIZE, PATCH, STRIDE = 12, 4, 2     # a 5 x 5 grid of overlapping 4 px patches
SIDE = (SIZE - PATCH) // STRIDE + 1
LATENT = 12
DIRECTIONS = ('down', 'up', 'right')
OFFSETS = (1, 2)
SCALE = 0.5                        # cpc.prediction_scale


class _PatchEncoder(nn.Module):
  """A patch's latent: ``tanh(Dense(flattened patch))``; no state, cheap to compile."""

  @nn.compact
  def __call__(self, patches, train: bool):
    del train
    return jnp.tanh(nn.Dense(LATENT, name='embed')(patches.reshape(patches.shape[0], -1)))


def _cpc_config():
  from tests.conftest import tiny_config  # pylint: disable=import-outside-toplevel
  config = tiny_config()
  config.method = 'cpc'
  config.data.image_size = SIZE
  section = config.cpc
  section.patch_size, section.patch_stride = PATCH, STRIDE
  section.target_dim, section.context_channels, section.context_blocks = 8, 8, 2
  section.directions, section.offsets = DIRECTIONS, OFFSETS
  section.prediction_scale = SCALE
  assert cpc.check_config(config) == []
  return config


def _cpc_model(config):
  section = config.cpc
  return patch_grid.CPCNetwork(
      encoder=_PatchEncoder(), patch_size=PATCH, stride=STRIDE,
      target_dim=section.target_dim, context_channels=section.context_channels,
      context_blocks=section.context_blocks, directions=DIRECTIONS, offsets=OFFSETS)


def _smooth_images(rng, count):
  """Images of a few smooth blobs: overlapping and nearby patches look alike, so
  that the rows below are predictable from the rows above."""
  coarse = rng.normal(size=(count, 4, 4, 3))
  axis = np.linspace(0, 3, SIZE)
  low, frac = np.minimum(axis.astype(int), 2), axis - np.minimum(axis.astype(int), 2)
  rows = coarse[:, low] * (1 - frac)[None, :, None, None] + coarse[:, low + 1] * frac[
      None, :, None, None]
  images = (rows[:, :, low] * (1 - frac)[None, None, :, None]
            + rows[:, :, low + 1] * frac[None, None, :, None])
  return images + 0.1 * rng.normal(size=images.shape)


def _cut(images):
  """``[B, S, S, 3] -> [B, G * G, p, p, 3]``, row by row (numpy)."""
  return np.stack([images[:, r * STRIDE:r * STRIDE + PATCH, c * STRIDE:c * STRIDE + PATCH]
                   for r in range(SIDE) for c in range(SIDE)], axis=1)


def _orient(grid, direction):
  """``[B, G, G, ...]`` turned so that ``direction`` points down its rows."""
  if direction in ('right', 'left'):
    grid = np.swapaxes(grid, 1, 2)
  return grid[:, ::-1] if direction in ('up', 'left') else grid


def _dense(x, layer):
  return x @ layer['kernel'] + layer.get('bias', 0.0)


def _context(latents, params, pad='top'):
  """The masked context network in float64: per block a 1 x 1 convolution, a 1 x 3
  one within the row (a zero column each side), a 2 x 1 one over the row above
  and the row itself (``pad='bottom'``: the row itself and the row below, the
  deliberately wrong variant), a 1 x 1 one back, the residual; a final relu."""
  relu = lambda v: np.maximum(v, 0.0)
  x = latents
  for i in range(len(params)):
    block = params[f'block{i + 1}']
    h = relu(_dense(x, block['reduce']))
    kernel = block['along_row']['kernel']                       # [1, 3, in, out]
    wide = np.pad(h, ((0, 0), (0, 0), (1, 1), (0, 0)))
    h = relu(sum(wide[:, :, j:j + SIDE] @ kernel[0, j] for j in range(3))
             + block['along_row']['bias'])
    kernel = block['from_above']['kernel']                      # [2, 1, in, out]
    tall = np.pad(h, ((0, 0), (1, 0) if pad == 'top' else (0, 1), (0, 0), (0, 0)))
    h = relu(tall[:, :SIDE] @ kernel[0, 0] + tall[:, 1:] @ kernel[1, 0]
             + block['from_above']['bias'])
    x = x + _dense(h, block['expand'])
  return relu(x)


def _cpc_reference(latents, params, *, pad='top', oriented_targets=True, shift=0,
                   candidates='global', images=None):
  """CPC's loss and per-direction losses in float64 from the latents
  ``[B, G, G, C]`` and the network's parameters.

  Per direction the context of the turned grid; per offset ``k`` the prediction at
  turned ``(r, c)``, times the scale, scored against the targets of all B x G x G
  patches, its positive the target at turned ``(r + k, c)``; the mean over the
  predictions of each (direction, offset), summed. The deliberately wrong
  variants: ``pad='bottom'`` (the context sees the row below), ``oriented_targets=
  False`` (the positive taken from the unturned grid), ``shift`` (the positive
  ``k + shift`` rows on), ``candidates='device'`` (only the 2 images of the
  prediction's own device, as without the gather), ``images`` (only those
  images' predictions, as one device's loss without the pmean).
  """
  b = latents.shape[0]
  targets = _dense(latents, params['target'])                     # [B, G, G, T]
  everyone = targets.reshape(b * SIDE * SIDE, -1)
  owner = np.repeat(np.arange(b) // (b // DEVICES), SIDE * SIDE)  # device of each target
  kept = np.arange(b) if images is None else np.asarray(images)
  per_direction = {}
  for direction in DIRECTIONS:
    context = _context(_orient(latents, direction), params[f'context_{direction}'], pad)
    turned = _orient(targets, direction) if oriented_targets else targets
    total = 0.0
    for k in OFFSETS:
      prediction = SCALE * _dense(context, params[f'predict_{direction}_{k}'])
      query = prediction[kept, :SIDE - k]                          # [b', G - k, G, T]
      positive = np.sum(query * turned[kept, k + shift:SIDE + shift], axis=-1)
      logits = query @ everyone.T                                  # [b', G - k, G, BGG]
      if candidates == 'device':
        device = kept // (b // DEVICES)
        logits = np.where(owner[None, None, None, :] == device[:, None, None, None],
                          logits, -np.inf)
      total += np.mean(_logsumexp(logits) - positive)
    per_direction[direction] = total
  return sum(per_direction.values()), per_direction


def _fit_predictions(latents, params, gain):
  """The prediction maps set to ``gain`` x the least-squares map from each
  context to its positive target: random maps would score every target alike,
  and a wrong pairing would then barely move the loss."""
  params = jax.tree.map(np.array, params)
  targets = _dense(_f64(latents), _f64(params['target']))
  for direction in DIRECTIONS:
    context = _context(_orient(_f64(latents), direction),
                       _f64(params[f'context_{direction}']))
    turned = _orient(targets, direction)
    for k in OFFSETS:
      x = context[:, :SIDE - k].reshape(-1, context.shape[-1])
      x = np.concatenate([x, np.ones((len(x), 1))], axis=1)
      y = turned[:, k:].reshape(-1, targets.shape[-1])
      solution = np.linalg.lstsq(x, y, rcond=None)[0] * gain
      layer = params[f'predict_{direction}_{k}']
      layer['kernel'], layer['bias'] = (solution[:-1].astype(np.float32),
                                        solution[-1].astype(np.float32))
  return params


@functools.cache
def _cpc_setup():
  """The config, network, parameters and patches of the CPC tests, and the loss
  and metrics of ``cpc.loss`` on 8 devices: one compilation for three tests."""
  config = _cpc_config()
  model = _cpc_model(config)
  rng = np.random.default_rng(0)
  patches = _cut(_smooth_images(rng, BATCH)).astype(np.float32)   # [16, 25, 4, 4, 3]
  params = _random_params(model, patches[:1], rng)
  flat = patches.reshape(BATCH * SIDE * SIDE, -1).astype(np.float64)
  latents = np.tanh(_dense(flat, _f64(params['encoder']['embed']))).reshape(
      BATCH, SIDE, SIDE, LATENT)
  params = _fit_predictions(latents, params, gain=10.0)
  key = jax.random.key(0)

  def replica(params, patches, index):
    ctx = Context(model=model, config=config, run=RUN, axis_name='data')
    out = cpc.loss(ctx, params, {}, {}, Batch(views=(patches,), index=index), key)
    return out.loss, out.metrics

  step = jax.jit(jax.shard_map(replica, mesh=_mesh(), in_specs=(P(), P('data'), P('data')),
                               out_specs=(P(), P())))
  loss, metrics = jax.device_get(step(params, patches, np.arange(BATCH, dtype=np.int32)))
  return config, model, params, patches, latents, key, float(loss), metrics



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


def _random_params(module, inputs, rng):
  """``module``'s parameters with numpy values: kernels He-scaled, biases small;
  shapes from ``eval_shape``, so nothing is compiled."""
  shapes = jax.eval_shape(functools.partial(module.init, train=False), jax.random.key(0),
                          inputs)['params']

  def value(path, leaf):
    if path[-1].key == 'kernel':
      return rng.normal(0, np.sqrt(2 / np.prod(leaf.shape[:-1])), leaf.shape)
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
  context to its positive target. Random maps would score a prediction's
  positive like any other target, and a wrong pairing would barely move the
  loss; fitted and scaled up (logits of std ~10), each wrong variant of the
  reference test moves it by several units."""
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


def test_cpc_loss_on_8_devices_matches_a_float64_reference():
  """Three directions ('up' flips the rows, 'right' swaps rows and columns),
  offsets 1 and 2, 16 images of a 5 x 5 grid on 8 devices: 1680 predictions,
  each against the 400 targets of the global batch."""
  _, _, params, _, latents, _, loss, metrics = _cpc_setup()
  want, per_direction = _cpc_reference(latents, _f64(params))
  # float32 on 8 devices against float64: latents in [-1, 1], logits up to ~70,
  # log-sum-exps over 400 terms, means over 240 and 320 rows (rounding of ~1e-7 of
  # the loss here). The bounds of tests/tolerances.py scaled to the compared value
  # (2e-4 of it, plus 1e-4 of it absolute) hold that many times over; each wrong
  # variant below moves the loss by more than 100 times the absolute part.
  tolerances.assert_close(loss, want)
  assert set(metrics) == {f'loss_{d}' for d in DIRECTIONS}
  for direction in DIRECTIONS:
    tolerances.assert_close(metrics[f'loss_{direction}'], per_direction[direction])
  largest = max(per_direction.values())        # the directions' losses differ: a
  assert np.ptp(list(per_direction.values())) > 100 * tolerances.SCALE * largest  # mix-up fails
  bound = 100 * tolerances.SCALE * want
  wrong = {
      'positive in grid order, not the turned one':
          _cpc_reference(latents, _f64(params), oriented_targets=False),
      'positive k - 1 rows on': _cpc_reference(latents, _f64(params), shift=-1),
      "candidates of the prediction's own device only (no gather)":
          _cpc_reference(latents, _f64(params), candidates='device'),
      "device 0's predictions only (no pmean)":
          _cpc_reference(latents, _f64(params), images=[0, 1]),
  }
  for name, (value, _) in wrong.items():
    assert abs(value - want) > bound, (name, value, want)


def test_cpc_context_sees_no_row_below_its_own():
  """``ContextNetwork`` (2 blocks): the latents of rows > r replaced, the context
  of rows <= r is unchanged and every row > r changes, for each r; the context
  itself is the float64 one. The same check fails the reference padded at the
  bottom (whose context sees the row below), and that reference's loss is far
  from the network's."""
  config, _, params, _, latents, _, loss, _ = _cpc_setup()
  section = config.cpc
  network = patch_grid.ContextNetwork(section.context_channels, section.context_blocks)
  variables = {'params': params['context_down']}
  rng = np.random.default_rng(1)
  original = latents[:4].astype(np.float32)
  perturbed = []
  for r in range(SIDE - 1):
    grid = original.copy()
    grid[:, r + 1:] = rng.uniform(-1, 1, grid[:, r + 1:].shape)
    perturbed.append(grid)
  contexts = np.asarray(jax.jit(network.apply)(
      variables, np.concatenate([original, *perturbed]))).reshape(SIDE, 4, SIDE, SIDE, -1)
  tolerances.assert_close(contexts[0], _context(_f64(original), _f64(params['context_down'])))
  magnitude = float(np.max(np.abs(contexts[0])))

  def leaks(context_of, grids):
    """For each r, the largest change of rows <= r and the smallest, over rows
    > r, of each row's largest change."""
    base = context_of(grids[0])
    result = []
    for r, grid in enumerate(grids[1:]):
      change = np.abs(context_of(grid) - base).max(axis=(0, 2, 3))     # per row
      result.append((change[:r + 1].max(), change[r + 1:].min()))
    return result

  # Rows <= r are computed from the same inputs: equal (they are, bit for bit, on
  # the CPUs tried), or within float32 rounding of values of this magnitude (1e-6
  # of it is ~10 ulps); rows > r move by a sizeable share of it, as the replaced
  # latents are as large as the originals.
  for above, below in leaks(lambda c: c, list(contexts)):
    assert above <= 1e-6 * magnitude, above
    assert below > 1e-2 * magnitude, below
  bottom = functools.partial(_context, params=_f64(params['context_down']), pad='bottom')
  for above, _ in leaks(bottom, [_f64(g) for g in (original, *perturbed)]):
    assert above > 1e-2 * magnitude                # the check catches the leak
  wrong, _ = _cpc_reference(latents, _f64(params), pad='bottom')
  assert abs(wrong - loss) > 100 * tolerances.SCALE * loss, (wrong, loss)


def test_cpc_loss_on_8_devices_equals_1_device():
  """``cpc.loss`` without a mesh axis on the same 16 images: the same loss and
  per-direction losses."""
  config, model, params, patches, _, key, loss, metrics = _cpc_setup()
  ctx = Context(model=model, config=config, run=RUN, axis_name=None)
  one = jax.jit(lambda params, patches: cpc.loss(
      ctx, params, {}, {}, Batch(views=(patches,), index=np.arange(BATCH, dtype=np.int32)),
      key))
  out = jax.device_get(one(params, patches))
  # The same global batch summed in another order (tests/tolerances.py); a missing
  # pmean or gather moves the loss by far more (see the float64 reference test).
  tolerances.assert_close(out.loss, loss)
  tolerances.assert_trees_close(out.metrics, metrics)


# ------------------------------------------------------------------------- AMDIM

PIXELS, CHANNELS, DIM = 6, 16, 16  # 6 x 6 fine map, 3 x 3 coarse map, 16-d embeddings
CLIP, PENALTY = 2.0, 0.05


class _GlobalLocal(nn.Module):
  """The interface of ``GlobalLocalNetwork``: ``(features, (global [B, D], fine
  [B, 6, 6, D], coarse [B, 3, 3, D]))``, Dense layers on the mean pixel, every
  pixel and every 2 x 2 block mean; no BatchNorm, no state."""

  @nn.compact
  def __call__(self, images, train: bool):
    del train
    b, h, w, c = images.shape
    pooled = images.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
    features = images.mean(axis=(1, 2))
    return features, (nn.Dense(DIM, name='global')(features),
                      nn.Dense(DIM, name='fine')(images),
                      nn.Dense(DIM, name='coarse')(pooled))


def _amdim_config():
  from tests.conftest import tiny_config  # pylint: disable=import-outside-toplevel
  config = tiny_config()
  config.method = 'amdim'
  config.amdim.embed_dim = DIM
  config.amdim.score_clip, config.amdim.score_penalty = CLIP, PENALTY
  config.amdim.terms = amdim.TERMS
  config.amdim.two_views = True
  return config


def _embedded(views, params):
  """The tiny network's (global, fine locations, coarse locations) of each view in
  float64: ``[B, D]``, ``[B, 36, D]``, ``[B, 9, D]``."""
  result = []
  for images in views:
    b = images.shape[0]
    pooled = images.reshape(b, PIXELS // 2, 2, PIXELS // 2, 2, -1).mean(axis=(2, 4))
    result.append((_dense(images.mean(axis=(1, 2)), params['global']),
                   _dense(images, params['fine']).reshape(b, -1, DIM),
                   _dense(pooled, params['coarse']).reshape(b, -1, DIM)))
  return result


def _amdim_reference(embedded, draws, *, clip=CLIP, own_negatives=False, partner=None,
                     images=None):
  """AMDIM's loss, each term's NCE and the regulariser in float64.

  Per term and direction (view 1 -> 2, 2 -> 1): scores ``<source_i, target_j,l> /
  sqrt(D)`` over the global batch (a coarse source: the position ``draws[view][i]``
  of image i's map), ``PENALTY`` x their mean square, clipped to ``clip *
  tanh(s / clip)``; per ``(i, l)`` the positive is image i's own location l and the
  negatives every location of every other image; the mean over ``(i, l)``. The
  NCE of a term and the regulariser are averaged over the two directions, and
  summed over the terms. Deliberately wrong variants: ``clip=None``,
  ``own_negatives`` (image i's other locations are negatives too), ``partner``
  (source i's positives and excluded image taken as image ``partner[i]``),
  ``images`` (only those sources' NCE and those targets' regulariser, as one
  device's values without the pmean).
  """
  n = embedded[0][0].shape[0]
  kept = np.arange(n) if images is None else np.asarray(images)
  partner = np.arange(n) if partner is None else np.asarray(partner)
  nce, regulariser = {}, 0.0
  for term in amdim.TERMS:
    source_index, target_index = {'global_fine': (0, 1), 'global_coarse': (0, 2),
                                  'coarse_coarse': (2, 2)}[term]
    values = []
    for source_view, target_view in ((0, 1), (1, 0)):
      source = embedded[source_view][source_index]
      if source.ndim == 3:
        source = source[np.arange(n), draws[source_view]]
      target = embedded[target_view][target_index]
      raw = np.einsum('id,jld->ijl', source, target) / np.sqrt(DIM)      # [N, N, L]
      regulariser += PENALTY * np.mean(np.square(raw[:, kept])) / 2
      scores = raw if clip is None else clip * np.tanh(raw / clip)
      locations = scores.shape[-1]
      own = (partner[:, None] == np.arange(n)[None, :])[:, :, None]
      others = _logsumexp(np.where(own, -np.inf, scores).reshape(n, -1))  # [N]
      positive = scores[np.arange(n), partner]                            # [N, L]
      negative = np.repeat(others[:, None], locations, axis=1)
      if own_negatives:
        mine = np.where(np.eye(locations, dtype=bool)[None], -np.inf, positive[:, None, :])
        negative = np.logaddexp(negative, _logsumexp(mine))
      per_location = np.logaddexp(positive, negative) - positive
      values.append(np.mean(per_location[kept]))
    nce[term] = sum(values) / 2
  return sum(nce.values()) + regulariser, nce, regulariser


def _draws(key, count, locations):
  """Each image's coarse source position per view, as ``amdim._one_position``
  draws it: keyed by the view and by the image's place in the global batch."""
  return [np.asarray(jax.vmap(lambda i, v=view: jax.random.randint(
      jax.random.fold_in(jax.random.fold_in(key, v), i), (), 0, locations))(
          jnp.arange(count))) for view in (0, 1)]


@functools.cache
def _amdim_setup():
  """Two views of 16 images, the parameters, and ``amdim.loss`` on 8 devices."""
  config = _amdim_config()
  model = _GlobalLocal()
  rng = np.random.default_rng(2)
  # Each image a colour of its own (orthonormal colours of 16 channels, the
  # images' only use is to give the embeddings this structure), brighter or darker
  # by 2 x 2 block, plus pixel noise; the three layers near one isometry. An
  # image's scores with its own locations are then a few units, with the other
  # images' near 0: the clip at 2 bites, the own image's other locations would be
  # strong negatives, and which coarse position is the source matters.
  colours = np.linalg.qr(rng.normal(size=(CHANNELS, CHANNELS)))[0][:BATCH] * 3.5
  brightness = np.kron(rng.uniform(0.2, 1.6, (BATCH, 3, 3)), np.ones((2, 2)))
  views = tuple((colours[:, None, None] * brightness[..., None]
                 + 0.5 * rng.normal(size=(BATCH, PIXELS, PIXELS, CHANNELS))).astype(np.float32)
                for _ in range(2))
  params = _random_params(model, views[0][:1], rng)
  shared = np.linalg.qr(rng.normal(size=(CHANNELS, CHANNELS)))[0][:, :DIM]
  for name in ('global', 'fine', 'coarse'):
    params[name]['kernel'] = (shared + 0.2 / np.sqrt(DIM) * rng.normal(
        size=(CHANNELS, DIM))).astype(np.float32)
  key = jax.random.key(4)

  def replica(params, view1, view2, index):
    ctx = Context(model=model, config=config, run=RUN, axis_name='data')
    out = amdim.loss(ctx, params, {}, {}, Batch(views=(view1, view2), index=index), key)
    return out.loss, out.metrics

  step = jax.jit(jax.shard_map(replica, mesh=_mesh(),
                               in_specs=(P(), P('data'), P('data'), P('data')),
                               out_specs=(P(), P())))
  loss, metrics = jax.device_get(step(params, *views, np.arange(BATCH, dtype=np.int32)))
  return config, model, params, views, key, float(loss), metrics


def test_amdim_loss_on_8_devices_matches_a_float64_reference():
  """All three terms, both directions, 16 images on 8 devices; 'coarse_coarse'
  from one drawn position of each image's 3 x 3 map."""
  _, _, params, views, key, loss, metrics = _amdim_setup()
  embedded = _embedded(_f64(views), _f64(params))
  draws = _draws(key, BATCH, embedded[0][2].shape[1])
  assert len(set(draws[0])) > 3 and np.any(draws[0] != draws[1])
  want, nce, regulariser = _amdim_reference(embedded, draws)
  raw = np.einsum('id,jld->ijl', embedded[0][0], embedded[1][1]) / np.sqrt(DIM)
  assert np.mean(np.abs(np.diagonal(raw)) > CLIP) > 0.5     # the clip matters
  # float32 on 8 devices against float64: scores of a few units, clipped to +-2,
  # log-sum-exps over 135-540 terms, means over 144-576 values (rounding of ~1e-7
  # of each value here); the bounds of tests/tolerances.py scaled to each value
  # hold that many times over, and each wrong variant below moves the loss by more
  # than 100 times their absolute part.
  tolerances.assert_close(loss, want)
  assert set(metrics) == {*(f'nce_{t}' for t in amdim.TERMS), 'regulariser'}
  for term in amdim.TERMS:
    tolerances.assert_close(metrics[f'nce_{term}'], nce[term])
  tolerances.assert_close(metrics['regulariser'], regulariser)
  local_draws = [d[np.arange(BATCH) % (BATCH // DEVICES)] for d in draws]
  wrong = {
      'no clip': _amdim_reference(embedded, draws, clip=None),
      "the own image's other locations as negatives":
          _amdim_reference(embedded, draws, own_negatives=True),
      "positives by each image's place on its device, not in the global batch":
          _amdim_reference(embedded, draws, partner=np.arange(BATCH) % (BATCH // DEVICES)),
      "device 0's values only (no pmean)": _amdim_reference(embedded, draws, images=[0, 1]),
  }
  for name, (value, _, _) in wrong.items():
    assert abs(value - want) > 100 * tolerances.SCALE * want, (name, value, want)
  # Coarse positions drawn by each image's place on its device, not in the global batch.
  value = _amdim_reference(embedded, local_draws)[1]['coarse_coarse']
  assert abs(value - nce['coarse_coarse']) > 100 * tolerances.SCALE * nce['coarse_coarse']


def test_amdim_loss_on_8_devices_equals_1_device():
  """``amdim.loss`` without a mesh axis on the same 16 images: the same loss and
  metrics."""
  config, model, params, views, key, loss, metrics = _amdim_setup()
  ctx = Context(model=model, config=config, run=RUN, axis_name=None)
  one = jax.jit(lambda params, view1, view2: amdim.loss(
      ctx, params, {}, {},
      Batch(views=(view1, view2), index=np.arange(BATCH, dtype=np.int32)), key))
  out = jax.device_get(one(params, *views))
  # The same global batch in another order (tests/tolerances.py); the coarse
  # positions drawn by global place make the two the same draws.
  tolerances.assert_close(out.loss, loss)
  tolerances.assert_trees_close(out.metrics, metrics)

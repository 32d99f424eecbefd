"""The per-replica train step on 8 devices equals the same step on 1 device.

Same global batch, same state: loss, gradients, updated parameters, optimizer
state, BatchNorm statistics and the method's own state (EMA target, queue,
memory bank) must agree to float32 round-off, for every method.
The tolerances are scaled to each tensor's magnitude: see ``tests/tolerances.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from contrastive import optim
from contrastive import parallel
from contrastive import train
from contrastive.evaluate import online_probe
from contrastive.methods import Batch, Context, RunInfo, get_method
from contrastive.methods import moco
from tests import tolerances

NUM_EXAMPLES = 100


def _mesh(num_devices):
  return jax.make_mesh((num_devices,), ('data',), devices=jax.devices()[:num_devices],
                       axis_types=(jax.sharding.AxisType.Auto,))


def _setup(config, num_devices, probe=None):
  """Method, its context, optimizer, the initial state on an n-device mesh, a batch."""
  method = get_method(config.method)
  run = RunInfo(num_examples=NUM_EXAMPLES, num_devices=num_devices, total_steps=10)
  ctx = Context(model=method.build_model(config), config=config, run=run, axis_name='data')
  schedule = optim.learning_rate_schedule(0.5, 2, 10)
  tx = optim.make_optimizer(config.optim, schedule)
  shape = (config.data.image_size,) * 2 + (3,)
  mesh = _mesh(num_devices)
  state = train.init_state(method, ctx, tx, mesh, probe)
  rng = np.random.default_rng(0)
  batch = {'image': rng.integers(0, 256, (config.global_batch_size, *shape), dtype=np.uint8),
           'index': rng.permutation(NUM_EXAMPLES)[:config.global_batch_size].astype(np.int32),
           'label': rng.integers(-1, 3, config.global_batch_size).astype(np.int32)}
  return method, ctx, tx, schedule, mesh, state, batch


def _start_epoch(method, ctx, tx, mesh, state):
  """The method's once-an-epoch program (the instance classifier's neighbour
  search), as the trainer runs it before an epoch's first step."""
  start_epoch = method.start_epoch(ctx.config)
  if start_epoch is None:
    return state
  specs = train.state_specs(method, ctx, tx)
  return parallel.per_replica(train.make_epoch_step(ctx, start_epoch), mesh,
                              in_specs=(specs,), out_specs=specs)(state)


def _run_steps(method, ctx, tx, schedule, mesh, state, batch, probe=None):
  specs = train.state_specs(method, ctx, tx, probe)
  step = parallel.per_replica(
      train.make_train_step(method, ctx, tx, schedule, probe),
      mesh, in_specs=(specs, P('data')), out_specs=(specs, P()))
  batch = jax.device_put(batch, NamedSharding(mesh, P('data')))
  state = _start_epoch(method, ctx, tx, mesh, state)
  state, metrics = step(state, batch)
  state, metrics = step(state, batch)   # second step: momentum and BN running stats
  return jax.device_get(state), jax.device_get(metrics)


def _canonical(config, method_state):
  """Method state without the padding rows, whose number depends on the device count."""
  if config.method == 'membank':
    return {'bank': method_state['bank'][:NUM_EXAMPLES]}
  if config.method == 'instance_cls':
    return {'neighbours': method_state['neighbours'][:NUM_EXAMPLES]}
  if config.method == 'cmc' and 'bank' in method_state:
    return {'bank': {view: bank[:NUM_EXAMPLES] for view, bank in method_state['bank'].items()}}
  return method_state


def _real_rows(tree):
  """Parameters (or optimizer state) without the classifier's padding rows, whose
  number depends on the device count (N rounded up to it)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x[:NUM_EXAMPLES] if any(
          getattr(key, 'key', None) == 'classifier' for key in path) else x, tree)


_assert_trees_close = tolerances.assert_trees_close


def _assert_trees_close_with_floor(got, want):
  """Each leaf at its own scale, but at least a thousandth of the tree's largest.

  A ViT's final LayerNorm bias feeds a head whose first BatchNorm removes any
  shift: its gradient is zero up to rounding (1e-7, beside gradients up to 60), so
  the bias, its move and its optimizer trace are rounding alone, which no
  tolerance scaled to itself compares. An n-times gradient or a missing pmean
  still moves every other leaf far beyond this.
  """
  floor = 1e-3 * max(float(np.max(np.abs(x))) for x in jax.tree.leaves(want))
  jax.tree.map(lambda g, w: np.testing.assert_allclose(
      g, w, rtol=2e-4, atol=tolerances.SCALE * max(float(np.max(np.abs(w))), floor)),
               got, want)


def _configure(config, method):
  config.method = method
  config.moco.queue_size = 64
  config.moco.key_bn = 'global'        # the only key BN that is layout-independent
  config.moco.momentum = 0.9
  config.membank.num_negatives = 40
  config.instance_cls.smoothing = 0.2      # the neighbour search runs before the steps
  config.instance_cls.smoothing_neighbours = 3
  config.instance_cls.neighbour_chunk = 8  # several chunks per shard on 1 device
  config.predictor.hidden_dim = 32         # BYOL's and MoCo v3's predictor, tiny
  config.byol.momentum = config.moco_v3.momentum = 0.9   # visible EMA moves in 2 steps
  config.cmc.num_negatives = 40
  config.cmc.queue_size = 64
  config.cmc.momentum = 0.9
  # CPC: 16 px images -> a 7 x 7 grid of 4 px patches, LayerNorm (no statistics).
  config.cpc.patch_size, config.cpc.patch_stride = 4, 2
  config.cpc.target_dim = config.cpc.context_channels = 8
  config.cpc.context_blocks = 2
  config.cpc.directions, config.cpc.offsets = ('down', 'left'), (2, 3)
  config.amdim.embed_dim = 16       # the tiny CIFAR-stem ResNet's stem and stage 1: 16 x 16
  config.amdim.local_maps = ('stem', 'stage1')


TINY_VIT = {'model.name': 'vit_tiny', 'model.vit.patch_size': 4, 'model.vit.depth': 2,
            'model.vit.hidden_dim': 16, 'model.vit.num_heads': 2, 'model.vit.mlp_dim': 32,
            'model.vit.position_embedding': 'sincos', 'model.vit.frozen_patch_projection': True}


def _override(config, overrides):
  for field, value in overrides.items():
    *sections, name = field.split('.')
    section = config
    for key in sections:
      section = section[key]
    section[name] = value


@pytest.mark.parametrize('method,optimizer,overrides', [
    ('simclr', 'lars', {}),
    ('simclr', 'lars', {'model.precision': 'bfloat16'}),    # mixed precision
    ('simclr', 'sgd', {'simclr.queue_size': 64}),           # SimCLR v2's memory
    ('moco', 'sgd', {}),
    ('membank', 'sgd', {}),
    ('instance_cls', 'sgd', {}),
    ('byol', 'lars', {}),
    ('moco_v3', 'lars', {}),
    # CMC's banks are the memory bank's rows (tested above); its queues and EMA here.
    ('cmc', 'sgd', {'cmc.negatives': 'queue'}),
    # MoCo v3 on a tiny ViT: the frozen patch projection in the model state,
    # BatchNorm only in the heads. SGD, not the recipe's AdamW: the gradient of the
    # attention's key bias is zero up to rounding (softmax ignores a shift common
    # to all keys), and AdamW, dividing by the gradient's own scale, would move it
    # by +-lr on that rounding, differently on 1 and 8 devices, to no effect.
    ('moco_v3', 'sgd', TINY_VIT),
    # CPC: one patch grid per image, negatives the global batch's patches; AdamW,
    # whose division by each gradient's own scale the 2-step comparison also covers.
    ('cpc', 'adamw', {'model.norm': 'layer'}),
    ('amdim', 'lars', {}),
], ids=lambda value: ','.join(f'{k}={v}' for k, v in value.items())
    if isinstance(value, dict) else str(value))
def test_step_on_8_devices_equals_1_device(config, method, optimizer, overrides):
  _configure(config, method)
  config.optim.name = optimizer
  _override(config, overrides)
  initial = None
  results = {}
  for n in (1, 8):
    setup = _setup(config, n)
    initial = jax.device_get(setup[5])
    results[n] = _run_steps(*setup)
  (state1, metrics1), (state8, metrics8) = results[1], results[8]
  np.testing.assert_allclose(metrics8['loss'], metrics1['loss'], rtol=1e-5)
  np.testing.assert_allclose(metrics8['grad_norm'], metrics1['grad_norm'], rtol=1e-4)
  bf16 = overrides.get('model.precision') == 'bfloat16'
  if bf16:
    # The parameters moved by gradients that bfloat16 rounds (see tolerances): their
    # moves are compared, at the scale of the moves.
    moved = lambda state: jax.tree.map(np.subtract, _real_rows(state.params),
                                       _real_rows(initial.params))
    _assert_trees_close(moved(state8), moved(state1), rtol=1e-2,
                        scale=tolerances.BFLOAT16_SCALE)
  elif 'vit' in config.model.name:
    _assert_trees_close_with_floor(state8.params, state1.params)
  else:
    _assert_trees_close(_real_rows(state8.params), _real_rows(state1.params))
  if method == 'cpc':          # LayerNorm: no statistics at all
    assert state8.model_state == state1.model_state == {}
  else:
    tolerances.assert_batch_stats_close(state8.model_state['batch_stats'],
                                       state1.model_state['batch_stats'])
  # The optimizer's traces are gradients, which bfloat16 rounds too.
  if 'vit' in config.model.name:
    _assert_trees_close_with_floor(state8.opt_state, state1.opt_state)
  else:
    _assert_trees_close(_real_rows(state8.opt_state), _real_rows(state1.opt_state),
                        rtol=1e-2 if bf16 else 2e-4,
                        scale=tolerances.BFLOAT16_SCALE if bf16 else tolerances.SCALE)
  if 'vit' in config.model.name:      # the EMA target holds that bias too
    _assert_trees_close_with_floor(state8.method_state['target']['params'],
                                   state1.method_state['target']['params'])
    _assert_trees_close(state8.method_state['target']['batch_stats'],
                        state1.method_state['target']['batch_stats'])
  else:
    _assert_trees_close(_canonical(config, state8.method_state),
                        _canonical(config, state1.method_state))
  assert int(state8.step) == int(state1.step) == 2
  # The step really moved the parameters and the BN statistics (CMC: of each view's
  # head and encoder; a ViT's are in its heads, its frozen projection stays).
  pick = lambda tree, view: tree if view is None else tree[view]
  stats = lambda state: state.model_state['batch_stats']
  if method in ('cpc', 'amdim'):    # no projection head: the encoder, the method's maps
    moved = {'cpc': ('target', 'predict_left_3', 'context_down'),
             'amdim': ('global_head', 'stem_head', 'stage1_head')}[method]
    for name in ('encoder', *moved):
      assert not all(map(np.allclose, jax.tree.leaves(state1.params[name]),
                         jax.tree.leaves(initial.params[name]))), name
    return
  for view in ('l', 'ab') if method == 'cmc' else (None,):
    assert not np.allclose(pick(state1.params['head'], view)['Dense_0']['kernel'],
                           pick(initial.params['head'], view)['Dense_0']['kernel'])
    if 'vit' in config.model.name:
      assert not np.allclose(stats(state1)['head']['BatchNorm_0']['mean'],
                             stats(initial)['head']['BatchNorm_0']['mean'])
      assert 'encoder' not in stats(state1)
      jax.tree.map(np.testing.assert_array_equal, state8.model_state['frozen'],
                   initial.model_state['frozen'])
      jax.tree.map(np.testing.assert_array_equal,
                   state8.method_state['target']['frozen'], initial.model_state['frozen'])
    else:
      assert not np.allclose(pick(stats(state1)['encoder'], view)['stem_bn']['mean'],
                             pick(stats(initial)['encoder'], view)['stem_bn']['mean'])
  if method == 'instance_cls':    # the neighbour search ran, the rows moved
    assert len(np.unique(state1.method_state['neighbours'])) > 10
    assert not np.allclose(_real_rows(state1.params)['classifier'],
                           _real_rows(initial.params)['classifier'])


def _gradients(method, ctx, tx, mesh, state, batch):
  specs = train.state_specs(method, ctx, tx)

  def replica(state, batch):
    views = train.device_views(jax.random.key(7), batch, method.views(ctx.config))
    inputs = Batch(views=views, index=batch['index'])
    grad_fn = jax.value_and_grad(
        lambda p: method.loss(ctx, p, state.model_state, state.method_state, inputs,
                              jax.random.key(3)).loss, has_aux=False)
    loss, grads = grad_fn(state.params)
    out = method.loss(ctx, state.params, state.model_state, state.method_state, inputs,
                      jax.random.key(3))
    return loss, grads, out.model_state

  fn = parallel.per_replica(replica, mesh, in_specs=(specs, P('data')),
                            out_specs=(P(), specs.params, P()))
  return jax.device_get(fn(state, jax.device_put(batch, NamedSharding(mesh, P('data')))))


@pytest.mark.parametrize('method', ['moco', 'instance_cls'])
def test_gradients_on_8_devices_equal_1_device(config, method):
  """The raw gradients of the whole loss: MoCo's queue split over 8 devices; the
  instance classifier's rows split over 8 devices, their gradients too."""
  _configure(config, method)
  results = {}
  for n in (1, 8):
    method_, ctx, tx, _, mesh, state, batch = _setup(config, n)
    state = _start_epoch(method_, ctx, tx, mesh, state)
    results[n] = _gradients(method_, ctx, tx, mesh, state, batch)
  (loss1, grads1, stats1), (loss8, grads8, stats8) = results[1], results[8]
  np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
  grads1, grads8 = _real_rows(grads1), _real_rows(grads8)
  _assert_trees_close(grads8, grads1)
  _assert_trees_close(stats8, stats1)
  # Guard against the classic shard_map trap: gradients n times too large.
  norm1 = float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(grads1))))
  norm8 = float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(grads8))))
  np.testing.assert_allclose(norm8, norm1, rtol=1e-4)


def test_online_probe_and_local_bn(config):
  """With per-device BN: the online probe, which trains on stop-gradient features,
  leaves the encoder, head, BN statistics and optimizer state bit-identical; the
  stored BN statistics are finite and the same on every replica (averaged), and
  differ from one device's, which normalises over the whole batch."""
  config.model.bn = 'local'
  probe = online_probe.create(num_classes=3, learning_rate=0.1)
  plain, _ = _run_steps(*_setup(config, 8))
  probed, metrics = _run_steps(*_setup(config, 8, probe), probe=probe)
  for field in ('params', 'model_state', 'opt_state'):
    jax.tree.map(np.testing.assert_array_equal, getattr(probed, field), getattr(plain, field))
  assert 0 <= metrics['online_probe_train_accuracy'] <= 1
  initial = jax.device_get(_setup(config, 1, probe)[5])
  assert not np.allclose(probed.probe['params']['kernel'], initial.probe['params']['kernel'])

  for leaf in jax.tree.leaves(plain.model_state):
    assert np.all(np.isfinite(leaf))
  one_device, _ = _run_steps(*_setup(config, 1))
  var = lambda state: state.model_state['batch_stats']['encoder']['stem_bn']['var']
  assert not np.allclose(var(plain), var(one_device), rtol=1e-6)


def test_a_non_finite_step_is_skipped_when_allowed(config):
  """With ``skip_nonfinite_steps``, a step whose loss is NaN (here: one image's
  index marks it) leaves parameters, optimizer and BN state as they were and
  only advances the step; finite steps still update them (the optimizer's own
  count stayed, so its warmup starts again at lr 0: two steps)."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  config.skip_nonfinite_steps = 1
  method, ctx, tx, schedule, mesh, state, batch = _setup(config, 8)
  poisoned = 7

  def loss(ctx, params, model_state, method_state, inputs, key):
    out = method.loss(ctx, params, model_state, method_state, inputs, key)
    bad = jax.lax.pmax(jnp.any(inputs.index == poisoned).astype(jnp.float32), 'data')
    return out._replace(loss=out.loss + jnp.where(bad > 0, jnp.nan, 0.0))

  nan_method = dataclasses.replace(method, loss=loss)
  specs = train.state_specs(nan_method, ctx, tx)
  step = parallel.per_replica(train.make_train_step(nan_method, ctx, tx, schedule), mesh,
                              in_specs=(specs, P('data')), out_specs=(specs, P()))
  before = jax.device_get(state)
  bad_batch = {**batch, 'index': batch['index'].copy()}
  bad_batch['index'][3] = poisoned
  good_batch = {**batch, 'index': np.where(batch['index'] == poisoned, 99, batch['index'])}
  state, scalars = step(state, jax.device_put(bad_batch, NamedSharding(mesh, P('data'))))
  assert not np.isfinite(float(scalars['loss'])) and int(state.step) == 1
  after = jax.device_get(state)
  for field in ('params', 'model_state', 'opt_state'):
    jax.tree.map(np.testing.assert_array_equal, getattr(after, field), getattr(before, field))
  for _ in range(2):
    state, scalars = step(state, jax.device_put(good_batch, NamedSharding(mesh, P('data'))))
  assert np.isfinite(float(scalars['loss'])) and int(state.step) == 3
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, b),
                       jax.device_get(state.params), before.params)
  assert any(jax.tree.leaves(moved))

"""The per-replica train step on 8 devices equals the same step on 1 device.

Same global batch, same state: loss, gradients, updated parameters, optimizer
state and BatchNorm statistics must agree to float32 round-off.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from contrastive import optim
from contrastive import parallel
from contrastive import train
from contrastive.methods import get_method

RTOL, ATOL = 2e-4, 2e-6


def _mesh(num_devices):
  return jax.make_mesh((num_devices,), ('data',), devices=jax.devices()[:num_devices],
                       axis_types=(jax.sharding.AxisType.Auto,))


def _setup(config):
  method = get_method(config.method)
  model = method.build_model(config)
  schedule = optim.learning_rate_schedule(0.5, 2, 10)
  tx = optim.make_optimizer(config.optim, schedule)
  shape = (config.data.image_size,) * 2 + (3,)
  state = train.init_state(method, model, tx, config, shape)
  # Warm the running BN statistics away from their init so updates are visible.
  batch = {'image': np.random.default_rng(0).integers(
      0, 256, (config.global_batch_size, *shape), dtype=np.uint8)}
  return method, model, tx, schedule, state, batch


def _run_step(num_devices, config, method, model, tx, schedule, state, batch):
  mesh = _mesh(num_devices)
  step = parallel.per_replica(
      train.make_train_step(method, model, config, tx, schedule, config.data.image_size),
      mesh, in_specs=(P(), P('data')), out_specs=(P(), P()))
  state = jax.device_put(state, NamedSharding(mesh, P()))
  batch = jax.device_put(batch, NamedSharding(mesh, P('data')))
  state, metrics = step(state, batch)
  state, metrics = step(state, batch)   # second step: momentum and BN running stats
  return jax.device_get(state), jax.device_get(metrics)


def _gradients(num_devices, config, method, model, state, batch):
  mesh = _mesh(num_devices)

  def replica(state, batch):
    key = jax.random.key(7)
    views = train.device_views(key, batch, config.aug, config.data.image_size)
    grad_fn = jax.value_and_grad(
        lambda p: method.loss(model, p, state.batch_stats, state.method_state, views,
                              config, 'data'), has_aux=True)
    (loss, (batch_stats, _)), grads = grad_fn(state.params)
    return loss, grads, batch_stats

  fn = parallel.per_replica(replica, mesh, in_specs=(P(), P('data')),
                            out_specs=(P(), P(), P()))
  return jax.device_get(fn(jax.device_put(state, NamedSharding(mesh, P())),
                           jax.device_put(batch, NamedSharding(mesh, P('data')))))


def _assert_trees_close(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=RTOL, atol=ATOL), a, b)


@pytest.mark.parametrize('optimizer', ['lars', 'sgd'])
def test_step_on_8_devices_equals_1_device(config, optimizer):
  config.optim.name = optimizer
  setup = _setup(config)
  state1, metrics1 = _run_step(1, config, *setup)
  state8, metrics8 = _run_step(8, config, *setup)
  np.testing.assert_allclose(metrics8['loss'], metrics1['loss'], rtol=1e-5)
  np.testing.assert_allclose(metrics8['grad_norm'], metrics1['grad_norm'], rtol=1e-4)
  _assert_trees_close(state8.params, state1.params)
  _assert_trees_close(state8.batch_stats, state1.batch_stats)
  _assert_trees_close(state8.opt_state, state1.opt_state)
  assert int(state8.step) == int(state1.step) == 2
  # The step really moved the parameters and the BN statistics.
  initial = setup[4]
  assert not np.allclose(state1.params['head']['Dense_0']['kernel'],
                         initial.params['head']['Dense_0']['kernel'])
  assert not np.allclose(state1.batch_stats['encoder']['stem_bn']['mean'],
                         initial.batch_stats['encoder']['stem_bn']['mean'])


def test_gradients_on_8_devices_equal_1_device(config):
  method, model, _, _, state, batch = _setup(config)
  loss1, grads1, stats1 = _gradients(1, config, method, model, state, batch)
  loss8, grads8, stats8 = _gradients(8, config, method, model, state, batch)
  np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
  _assert_trees_close(grads8, grads1)
  _assert_trees_close(stats8, stats1)
  # Guard against the classic shard_map trap: gradients n times too large.
  norm1 = float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(grads1))))
  norm8 = float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(grads8))))
  np.testing.assert_allclose(norm8, norm1, rtol=1e-4)


def test_local_bn_statistics_are_averaged_over_devices(config):
  """Per-device BN normalises with local statistics; the stored running
  statistics are the mean over devices, identical on every replica."""
  config.model.bn = 'local'
  setup = _setup(config)
  state8, _ = _run_step(8, config, *setup)
  state1, _ = _run_step(1, config, *setup)
  for leaf in jax.tree.leaves(state8.batch_stats):
    assert np.all(np.isfinite(leaf))
  # With local statistics the two layouts compute different things.
  assert not np.allclose(state8.batch_stats['encoder']['stem_bn']['var'],
                         state1.batch_stats['encoder']['stem_bn']['var'], rtol=1e-6)

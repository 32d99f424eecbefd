"""MoCo and memory-bank state: EMA, queue, shuffle BN and bank updates, exactly."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from contrastive import models
from contrastive import train
from contrastive.methods import Context, RunInfo, ema, get_method, membank, moco
from contrastive.methods import queue as queue_lib
from contrastive.methods import rows as sharded_rows
from tests import tolerances


def _mesh8():
  return jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))


def test_ema_is_exact(config):
  rng = np.random.default_rng(0)
  target = {'a': rng.normal(size=(3, 4)).astype(np.float32),
            'b': {'c': rng.normal(size=(5,)).astype(np.float32)}}
  online = jax.tree.map(lambda x: x + np.float32(1.5), target)
  got = jax.jit(ema.ema)(target, online, jnp.float32(0.99))
  want = jax.tree.map(lambda t, o: np.float32(0.99) * t + np.float32(1 - 0.99) * o,
                      target, online)
  # Exact up to float32 rounding (XLA may fuse the sum into one fused multiply-add).
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=5e-7), got, want)
  assert float(ema.momentum_at(0, 0.99, 'cosine', 100)) == pytest.approx(0.99)
  assert float(ema.momentum_at(50, 0.99, 'cosine', 100)) == pytest.approx(0.995)
  assert float(ema.momentum_at(100, 0.99, 'cosine', 100)) == pytest.approx(1.0)
  assert float(ema.momentum_at(70, 0.99, 'constant', 100)) == pytest.approx(0.99)


def test_enqueue_wraps_around():
  queue = jnp.zeros((6, 2))
  keys = jnp.arange(4, dtype=jnp.float32).reshape(2, 2) + 1
  queue, pointer = queue_lib.enqueue(queue, jnp.int32(2), keys, None, 6)
  np.testing.assert_array_equal(queue[2:4], keys)
  assert int(pointer) == 4
  queue, pointer = queue_lib.enqueue(queue, pointer, keys + 10, None, 6)
  assert int(pointer) == 0                                   # wrapped
  queue, pointer = queue_lib.enqueue(queue, pointer, keys + 20, None, 6)
  np.testing.assert_array_equal(queue, np.concatenate([keys + 20, keys, keys + 10]))
  assert int(pointer) == 2


def test_sharded_enqueue_keeps_one_global_fifo():
  """8 shards of one FIFO ring: each step's global batch of keys lands, in batch
  order, at the ring pointer, as on one device, whatever device wrote which key."""
  mesh, per_step, size, dim = _mesh8(), 16, 48, 3

  def update(queue, pointer, keys):
    return queue_lib.enqueue(queue, pointer, keys, 'data', size)

  step = jax.jit(jax.shard_map(update, mesh=mesh, in_specs=(P('data'), P(), P('data')),
                               out_specs=(P('data'), P())))
  queue, pointer = jnp.zeros((size, dim), jnp.float32), jnp.int32(0)
  batches = [(s + 1 + np.arange(per_step)[:, None] / 100 + np.zeros(dim)).astype(np.float32)
             for s in range(4)]
  for keys in batches:
    queue, pointer = step(queue, pointer, jnp.asarray(keys))
  # Four batches into three slots: the first was overwritten by the fourth.
  np.testing.assert_array_equal(queue, np.concatenate([batches[3], batches[1], batches[2]]))
  assert int(pointer) == 4 * per_step % size


@pytest.mark.parametrize('num_devices,bn_groups', [(8, 0), (1, 8), (2, 4)])
def test_shuffle_bn_normalises_groups_of_the_permuted_batch(config, num_devices, bn_groups):
  """Shuffle BN: one global permutation of the key batch, then each group of it
  (one per device, or ``bn_groups`` split over the devices: MoCo's split BN,
  which also serves one device) normalised with its own statistics; keys come
  back in the original order, running statistics are the groups' mean."""
  config.method = 'moco'
  config.moco.key_bn = 'shuffle'
  config.head.use_bn = False        # MoCo's heads; BN lives in the encoder
  mesh = jax.make_mesh((num_devices,), ('data',), devices=jax.devices()[:num_devices],
                       axis_types=(jax.sharding.AxisType.Auto,))
  total, groups = 32, bn_groups or num_devices
  model = moco.METHOD.build_model(config)
  images = jax.random.uniform(jax.random.key(0), (total, 16, 16, 3))
  variables = models.with_bn_axis(model, None).init(jax.random.key(1), images[:2],
                                                    train=False)
  shuffle_key = jax.random.key(5)

  def replica(target, views):
    return moco.compute_keys(model, target, views, shuffle_key, 'shuffle', 'data',
                             bn_groups)

  keys, stats = jax.jit(jax.shard_map(
      replica, mesh=mesh, in_specs=(P(), P('data')), out_specs=(P('data'), P())))(
          ema.init(variables), images)

  # Reference: permute the global batch, run each group with its own BN
  # statistics, put the outputs back in the original order.
  permutation = np.asarray(jax.random.permutation(shuffle_key, total))
  local_apply = jax.jit(functools.partial(
      models.with_bn_axis(model, None).apply, train=True, mutable=['batch_stats']))
  size = total // groups
  outputs = np.zeros((total, config.head.out_dim), np.float32)
  group_stats = []
  for g in range(groups):
    rows = permutation[g * size:(g + 1) * size]
    (_, proj), updates = local_apply(variables, images[rows])
    outputs[rows] = np.asarray(proj)
    group_stats.append(updates['batch_stats'])
  want = outputs / np.linalg.norm(outputs, axis=1, keepdims=True)
  tolerances.assert_close(keys, want, rtol=1e-4)   # a sharded program vs a loop
  mean_stats = jax.tree.map(lambda *xs: np.mean(xs, axis=0), *group_stats)
  tolerances.assert_trees_close(stats['batch_stats'], mean_stats, rtol=1e-4)
  # The same groups without the permutation would have given other keys.
  unshuffled = np.concatenate([
      np.asarray(local_apply(variables, images[g * size:(g + 1) * size])[0][1])
      for g in range(groups)])
  assert not np.allclose(unshuffled / np.linalg.norm(unshuffled, axis=1, keepdims=True),
                         want, atol=1e-3)


def _bank_context(config, axis_name=None):
  run = RunInfo(num_examples=30, num_devices=8, total_steps=1)
  return Context(model=None, config=config, run=run, axis_name=axis_name)


def test_memory_bank_update_is_exact(config):
  config.membank.momentum = 0.5
  bank = np.asarray(membank.init_state(_bank_context(config), None, jax.random.key(0))['bank'])
  assert bank.shape == (32, config.head.out_dim)              # 30 rounded up to 8 shards
  np.testing.assert_allclose(np.linalg.norm(bank[:30], axis=1), 1.0, rtol=1e-6)
  index = np.array([29, 0, 7, 8, 15, 16, 3, 22], np.int32)
  embeddings = np.random.default_rng(1).normal(size=(8, config.head.out_dim))
  embeddings = (embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)).astype(
      np.float32)

  def replica(state, for_update):
    return membank.update_state(_bank_context(config, 'data'), state, None, for_update, 0)

  got = np.asarray(jax.jit(jax.shard_map(
      replica, mesh=_mesh8(), in_specs=(P('data'), P('data')), out_specs=P('data')))(
          {'bank': jnp.asarray(bank)}, {'embeddings': embeddings, 'index': index})['bank'])
  want = bank.copy()
  mixed = 0.5 * bank[index] + 0.5 * embeddings
  want[index] = mixed / np.linalg.norm(mixed, axis=1, keepdims=True)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  untouched = np.setdiff1d(np.arange(32), index)
  np.testing.assert_array_equal(got[untouched], bank[untouched])


def test_memory_bank_reads_rows_across_shards(config):
  bank = membank.init_state(_bank_context(config), None, jax.random.key(0))['bank']
  rows = jnp.asarray([31, 0, 4, 5, 17, 29], jnp.int32)
  got = jax.jit(jax.shard_map(lambda b: sharded_rows.read(b, rows, 'data'), mesh=_mesh8(),
                              in_specs=P('data'), out_specs=P()))(bank)
  np.testing.assert_array_equal(got, np.asarray(bank)[np.asarray(rows)])


@pytest.mark.parametrize('field,value,message', [
    ('moco.queue_size', 40, r'config.moco.queue_size=40 must be a positive multiple of '
                            r'the keys enqueued per step, 16 .*try 32'),
    ('moco.key_bn', 'sync', r"config.moco.key_bn='sync'; valid: shuffle, global, local"),
    ('moco.momentum_schedule', 'linear', r"momentum_schedule='linear'"),
    ('moco.bn_groups', 3, r'config.moco.bn_groups=3 must divide the 16 keys'),
    ('moco.bn_groups', -1, r'config.moco.bn_groups=-1 must be >= 0'),
])
def test_moco_config_errors_name_the_field(config, field, value, message):
  config.method = 'moco'
  section, name = field.split('.')
  config[section][name] = value
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, '/tmp/unused-workdir-for-config-errors')


def test_symmetric_queue_needs_two_keys_per_image(config):
  config.method = 'moco'
  config.moco.symmetric = True
  config.moco.queue_size = 48                    # a multiple of 16, not of 32
  with pytest.raises(ValueError, match=r'32 \(global batch 16 x 2 views'):
    train.train_and_evaluate(config, '/tmp/unused-workdir-for-config-errors')


@pytest.mark.parametrize('method,field,value,message', [
    ('simclr', 'simclr.temperature', 0.0, r'config.simclr.temperature=0.0 must be > 0'),
    ('moco', 'moco.temperature', -0.1, r'config.moco.temperature=-0.1 must be > 0'),
    ('moco', 'moco.momentum', 1.5, r'config.moco.momentum=1.5 must lie in \[0, 1\]'),
    ('membank', 'membank.temperature', 0.0, r'config.membank.temperature=0.0 must be > 0'),
    ('membank', 'membank.momentum', 1.0, r'config.membank.momentum=1.0 must lie in \[0, 1\)'),
    ('membank', 'membank.num_negatives', -1, r'num_negatives=-1 must be >= 0'),
])
def test_method_sections_are_checked_before_any_data_is_read(config, monkeypatch, method,
                                                             field, value, message):
  from contrastive.data import sources  # pylint: disable=import-outside-toplevel

  def no_data(*args, **kwargs):
    raise AssertionError('data was read before the config was checked')

  monkeypatch.setattr(sources, 'load_arrays', no_data)
  config.method = method
  section, name = field.split('.')
  config[section][name] = value
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, '/tmp/unused-workdir-for-config-errors')
  # The same message comes from the method alone, before the trainer adds its own.
  assert any(re.search(message, problem) for problem in get_method(method).check_config(config))

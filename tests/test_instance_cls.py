"""Instance classification's sharded parts against dense float64 references.

The sharded soft-target cross-entropy and its gradient, the ring-streamed
neighbour search (ties and rows in other shards included) and the contrastive
prior's rows, each on 8 devices (and 1) against numpy computed on the whole table.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from contrastive import losses
from contrastive import models
from contrastive import optim
from contrastive import train
from contrastive.data import evaluation
from contrastive.methods import Context, RunInfo, instance_cls
from contrastive.methods import rows as sharded_rows
from tests import tolerances


def _mesh(num_devices):
  return jax.make_mesh((num_devices,), ('data',), devices=jax.devices()[:num_devices],
                       axis_types=(jax.sharding.AxisType.Auto,))


def _soft_targets(rng, m, num_classes, k):
  """Each row: its own class with 1 - alpha, k others with alpha / k."""
  classes = np.stack([rng.choice(num_classes, 1 + k, replace=False) for _ in range(m)])
  weights = np.concatenate([np.full((m, 1), 0.7), np.full((m, k), 0.3 / k)], axis=1)
  return classes.astype(np.int32), weights.astype(np.float32)


def test_sharded_soft_cross_entropy_equals_float64_reference():
  """Value and gradient, 21 classes on 8 devices (3 padding columns on the last)."""
  rng = np.random.default_rng(0)
  m, num_classes, padded, k = 6, 21, 24, 3
  logits = rng.normal(scale=3.0, size=(m, padded)).astype(np.float32)
  classes, weights = _soft_targets(rng, m, num_classes, k)

  def replica(local_logits):
    columns = jax.lax.axis_index('data') * local_logits.shape[1] + jnp.arange(
        local_logits.shape[1])
    per_row = losses.sharded_soft_cross_entropy(
        local_logits, columns[0], classes, weights, 'data',
        column_mask=columns < num_classes)
    return per_row

  def mean_loss(full_logits):
    per_row = jax.shard_map(replica, mesh=_mesh(8), in_specs=P(None, 'data'),
                            out_specs=P())(full_logits)
    return jnp.mean(per_row), per_row

  (_, per_row), grads = jax.jit(jax.value_and_grad(mean_loss, has_aux=True))(logits)

  real = logits[:, :num_classes].astype(np.float64)
  log_softmax = real - np.log(np.sum(np.exp(real - real.max(1, keepdims=True)), 1,
                                     keepdims=True)) - real.max(1, keepdims=True)
  target = np.zeros_like(real)
  np.put_along_axis(target, classes, weights.astype(np.float64), axis=1)
  want = -np.sum(target * log_softmax, axis=1)
  np.testing.assert_allclose(per_row, want, rtol=1e-5)
  # d mean / d logits = (softmax - target) / m on the classes, 0 on the padding.
  want_grads = (np.exp(log_softmax) - target) / m
  tolerances.assert_close(np.asarray(grads)[:, :num_classes], want_grads)
  np.testing.assert_array_equal(np.asarray(grads)[:, num_classes:], 0.0)


def _dense_neighbours(table, num_rows, k):
  """Each row's k most similar other rows: by similarity, then the lower index."""
  table = table[:num_rows].astype(np.float64)
  sims = table @ table.T
  found = []
  for i in range(num_rows):
    others = np.array([j for j in range(num_rows) if j != i])
    order = np.lexsort((others, -sims[i, others]))      # last key sorts first
    found.append(others[order[:k]])
  return np.stack(found)


@pytest.mark.parametrize('num_devices,chunk', [(8, 4), (8, 64), (1, 7)])
def test_sharded_nearest_rows_equal_dense_top_k(num_devices, chunk):
  """45 rows with values in {-1, -0.5, 0, 0.5, 1}: every similarity is exact in
  float32 and many tie, so the tie rule (lower global index) is tested too.
  Chunk 4 does not divide the 6 rows of a shard (padding in the last chunk)."""
  rng = np.random.default_rng(1)
  num_rows, k = 45, 5
  padded = sharded_rows.padded_rows(num_rows, num_devices)
  table = (rng.integers(-2, 3, size=(padded, 4)) / 2).astype(np.float32)
  table[10] = table[40]                       # duplicate rows in different shards
  table[num_rows:] = 9.0                      # padding must never be a neighbour

  if num_devices == 1:     # no mesh at all: the single-device path
    found, similarity = jax.jit(
        lambda t: sharded_rows.nearest_rows(t, k, num_rows, None, chunk))(table)
  else:
    found, similarity = jax.jit(jax.shard_map(
        lambda shard: sharded_rows.nearest_rows(shard, k, num_rows, 'data', chunk),
        mesh=_mesh(num_devices), in_specs=P('data'), out_specs=(P('data'), P('data'))))(
            table)
  want = _dense_neighbours(table, num_rows, k)
  np.testing.assert_array_equal(np.asarray(found)[:num_rows], want)
  rows = table[:num_rows].astype(np.float64)
  np.testing.assert_allclose(np.asarray(similarity)[:num_rows],
                             np.take_along_axis(rows @ rows.T, want, axis=1))
  assert 40 in want[10] and 10 in want[40]


def _prior_setup(config, num_devices, num_examples):
  config.method = 'instance_cls'
  config.optim.name = 'sgd'
  method = instance_cls.METHOD
  run = RunInfo(num_examples=num_examples, num_devices=num_devices, total_steps=4)
  ctx = Context(model=method.build_model(config), config=config, run=run,
                axis_name='data')
  tx = optim.make_optimizer(config.optim, optim.learning_rate_schedule(0.1, 0, 4))
  mesh = _mesh(num_devices)
  return method, ctx, tx, mesh


@pytest.mark.parametrize('num_devices', [1, 8])
def test_contrastive_prior_rows_are_the_random_networks_train_mode_features(
    config, num_devices):
  """40 images in batches of 16 (the last one 8 images, padded with copies of them):
  each image's row is its normalised head output under batch-statistics BN, at its
  split index; the padding rows stay zero."""
  num_examples, local_batch = 40, 16
  method, ctx, tx, mesh = _prior_setup(config, num_devices, num_examples)
  state = train.init_state(method, ctx, tx, mesh)
  initial = jax.device_get(state)
  specs = train.state_specs(method, ctx, tx)
  size = config.data.image_size
  rng = np.random.default_rng(2)
  images = rng.integers(0, 256, (num_examples, size, size, 3), dtype=np.uint8)
  index = rng.permutation(num_examples).astype(np.int32)
  layout = train.loop.Layout(mesh, local_batch, local_batch // num_devices, None)
  batches = list(evaluation.padded_batches(images, None, local_batch, index))
  state = train.initialise_from_data(
      state, train.make_prior_step(ctx, instance_cls.write_prior), specs, layout,
      iter(batches), size)
  got = np.asarray(jax.device_get(state.params['classifier']))

  # The reference: one device, the whole (filled) batch through BN at once.
  reference = models.with_bn_axis(ctx.model, None)
  want = np.zeros((num_examples, config.head.out_dim))
  for batch in batches:
    batch = train.fill_padding(batch)
    pixels = train.augment.preprocess_eval(batch['image'], config.aug)
    (_, projections), _ = reference.apply(
        {'params': {k: v for k, v in initial.params.items() if k != 'classifier'},
         **initial.model_state}, pixels, train=True, mutable=['batch_stats'])
    real = batch['mask']
    want[batch['index'][real]] = np.asarray(losses.l2_normalize(projections))[real]
  tolerances.assert_close(got[:num_examples], want)
  np.testing.assert_array_equal(got[num_examples:], 0.0)
  assert not np.allclose(got[:num_examples], initial.params['classifier'][:num_examples])


def test_classifier_rows_and_momentum_are_split_across_devices(config):
  """No device holds all N rows: the classifier and its momentum are sharded by
  rows, everything else replicated."""
  method, ctx, tx, mesh = _prior_setup(config, 8, num_examples=100)
  state = train.init_state(method, ctx, tx, mesh)
  rows = state.params['classifier']
  assert rows.shape == (104, config.head.out_dim)
  assert {shard.data.shape for shard in rows.addressable_shards} == {
      (13, config.head.out_dim)}
  momentum = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state.opt_state)
              if any(getattr(key, 'key', None) == 'classifier' for key in path)]
  assert momentum and all(leaf.sharding.spec == P('data') for leaf in momentum)
  kernel = state.params['head']['Dense_0']['kernel']
  assert kernel.sharding.spec == P()


def test_instance_cls_config_problems_name_their_fields(config):
  config.method = 'instance_cls'
  config.instance_cls.temperature = 0.0
  config.instance_cls.smoothing = 1.0
  config.optim.name = 'lars'
  problems = instance_cls.check_config(config)
  text = '\n'.join(problems)
  assert 'config.instance_cls.temperature=0.0' in text
  assert 'config.instance_cls.smoothing=1.0' in text
  assert "config.optim.name='lars'" in text

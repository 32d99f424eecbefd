"""Contrastive losses against loop-by-loop references, and their per-replica forms on 8 devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from contrastive import losses
from tests import tolerances


def reference_nt_xent(z1, z2, temperature, queue=()):
  """The SimCLR paper's definition, one anchor at a time, in float64 numpy; the
  rows of ``queue`` (SimCLR v2's memory) are more negatives of every anchor."""
  z = np.concatenate([z1, z2]).astype(np.float64)
  z /= np.linalg.norm(z, axis=1, keepdims=True)
  queue = np.asarray(queue, np.float64)
  n = len(z1)
  total = 0.0
  for i in range(2 * n):
    positive = (i + n) % (2 * n)
    others = [j for j in range(2 * n) if j != i]
    logits = np.array([z[i] @ z[j] / temperature for j in others] +
                      [z[i] @ row / temperature for row in queue])
    log_denominator = np.log(np.sum(np.exp(logits - logits.max()))) + logits.max()
    total += -(z[i] @ z[positive] / temperature - log_denominator)
  return total / (2 * n)


@pytest.mark.parametrize('temperature', [0.1, 0.5])
def test_nt_xent_matches_reference(temperature):
  rng = np.random.default_rng(0)
  z1, z2 = rng.normal(size=(6, 5)) * 3, rng.normal(size=(6, 5))
  got = losses.nt_xent(jnp.asarray(z1), jnp.asarray(z2), temperature)
  np.testing.assert_allclose(got, reference_nt_xent(z1, z2, temperature), rtol=1e-5)


def test_nt_xent_is_scale_invariant_and_rewards_aligned_views():
  rng = np.random.default_rng(1)
  z = rng.normal(size=(8, 16))
  noise = rng.normal(size=(8, 16))
  aligned = losses.nt_xent(z, z + 0.01 * noise, 0.5)
  unaligned = losses.nt_xent(z, noise, 0.5)
  assert aligned < unaligned
  np.testing.assert_allclose(losses.nt_xent(10 * z, noise, 0.5), unaligned, rtol=1e-5)


def test_per_replica_nt_xent_equals_global_on_8_devices():
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  rng = np.random.default_rng(2)
  z1 = jnp.asarray(rng.normal(size=(32, 8)), jnp.float32)
  z2 = jnp.asarray(rng.normal(size=(32, 8)), jnp.float32)

  def global_loss(z1, z2):
    return losses.nt_xent(z1, z2, 0.2)

  def replica_loss(z1, z2):
    return losses.nt_xent(z1, z2, 0.2, axis_name='data')

  sharded = jax.jit(jax.shard_map(
      jax.value_and_grad(replica_loss, argnums=(0, 1)), mesh=mesh,
      in_specs=(P('data'), P('data')), out_specs=(P(), (P('data'), P('data')))))
  loss8, (g1_8, g2_8) = sharded(z1, z2)
  loss1, (g1, g2) = jax.value_and_grad(global_loss, argnums=(0, 1))(z1, z2)
  np.testing.assert_allclose(loss8, loss1, rtol=1e-6)
  np.testing.assert_allclose(loss8, reference_nt_xent(np.asarray(z1), np.asarray(z2), 0.2),
                             rtol=1e-5)
  tolerances.assert_close(g1_8, g1, rtol=1e-5)      # 8 vs 1 device: tests/tolerances.py
  tolerances.assert_close(g2_8, g2, rtol=1e-5)


@pytest.mark.parametrize('temperature', [0.1, 0.5])
def test_nt_xent_with_queue_negatives_matches_reference(temperature):
  rng = np.random.default_rng(7)
  z1, z2 = rng.normal(size=(6, 5)) * 3, rng.normal(size=(6, 5))
  queue = _unit_rows(rng, (20, 5))
  got = losses.nt_xent(jnp.asarray(z1), jnp.asarray(z2), temperature,
                       negatives=jnp.asarray(queue))
  want = reference_nt_xent(z1, z2, temperature, queue)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert want > reference_nt_xent(z1, z2, temperature) + 0.1     # the queue counts


def test_nt_xent_without_negatives_is_the_v1_loss_bit_for_bit():
  """Without a queue, nt_xent is SimCLR v1's log-softmax over the 2N - 1 other
  views, to the last bit (not a log-sum-exp combined with an empty queue)."""
  rng = np.random.default_rng(8)
  z1, z2 = (jnp.asarray(rng.normal(size=(6, 5)), jnp.float32) for _ in range(2))
  z = losses.l2_normalize(jnp.concatenate([z1, z2]))
  logits = jnp.where(jnp.eye(12, dtype=bool), -jnp.inf, z @ z.T / 0.2)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  v1 = -jnp.mean(jnp.take_along_axis(log_probs, (jnp.arange(12)[:, None] + 6) % 12, axis=-1))
  np.testing.assert_array_equal(losses.nt_xent(z1, z2, 0.2), v1)


def test_per_replica_nt_xent_with_sharded_queue_equals_global_on_8_devices():
  """The batch split by rows and the queue into 8 shards of K/8 rows, never
  gathered: the loss and gradients (z1, z2 and the queue) of one device."""
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  rng = np.random.default_rng(9)
  z1 = jnp.asarray(rng.normal(size=(32, 8)), jnp.float32)
  z2 = jnp.asarray(rng.normal(size=(32, 8)), jnp.float32)
  queue = jnp.asarray(_unit_rows(rng, (64, 8)), jnp.float32)

  def replica_loss(z1, z2, queue):
    return losses.nt_xent(z1, z2, 0.2, axis_name='data', negatives=queue)

  sharded = jax.jit(jax.shard_map(
      jax.value_and_grad(replica_loss, argnums=(0, 1, 2)), mesh=mesh,
      in_specs=(P('data'),) * 3, out_specs=(P(), (P('data'),) * 3)))
  loss8, grads8 = sharded(z1, z2, queue)
  loss1, grads1 = jax.value_and_grad(
      lambda z1, z2, queue: losses.nt_xent(z1, z2, 0.2, negatives=queue),
      argnums=(0, 1, 2))(z1, z2, queue)
  np.testing.assert_allclose(loss8, loss1, rtol=1e-6)
  np.testing.assert_allclose(
      loss8, reference_nt_xent(*map(np.asarray, (z1, z2)), 0.2, np.asarray(queue)),
      rtol=1e-5)
  for got, want in zip(grads8, grads1):
    assert np.abs(want).max() > 0
    # 8 shards sum in another order than 1 device: float32 round-off that grows
    # with each tensor's magnitude, hence its own scale (tests/tolerances.py).
    tolerances.assert_close(got, want, rtol=1e-5)


def reference_info_nce(q, k, queue, temperature, mask=None):
  """MoCo's definition, one query at a time, in float64 numpy: the positive logit
  q.k first, then q.queue^T over the rows the mask keeps."""
  q = q / np.linalg.norm(q, axis=1, keepdims=True)
  k = k / np.linalg.norm(k, axis=1, keepdims=True)
  total = 0.0
  for i in range(len(q)):
    keep = np.ones(len(queue), bool) if mask is None else mask[i]
    logits = np.concatenate([[q[i] @ k[i]], queue[keep] @ q[i]]) / temperature
    top = logits.max()
    total += np.log(np.sum(np.exp(logits - top))) + top - logits[0]
  return total / len(q)


def _unit_rows(rng, shape):
  x = rng.normal(size=shape)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize('temperature', [0.07, 0.2])
def test_info_nce_matches_reference(temperature):
  rng = np.random.default_rng(3)
  q, k = rng.normal(size=(6, 5)) * 4, rng.normal(size=(6, 5))
  queue = _unit_rows(rng, (20, 5))
  got = losses.info_nce(jnp.asarray(q), jnp.asarray(k), jnp.asarray(queue), temperature)
  np.testing.assert_allclose(got, reference_info_nce(q, k, queue, temperature), rtol=1e-5)


def test_info_nce_mask_removes_negatives():
  rng = np.random.default_rng(4)
  q, k, queue = rng.normal(size=(4, 3)), rng.normal(size=(4, 3)), _unit_rows(rng, (10, 3))
  mask = rng.random((4, 10)) < 0.5
  got = losses.info_nce(q, k, queue, 0.1, negative_mask=mask)
  np.testing.assert_allclose(got, reference_info_nce(q, k, queue, 0.1, mask), rtol=1e-5)


def test_sharded_info_nce_equals_global_on_8_devices():
  """Queries and keys split by rows, the queue split into 8 shards of K/8 rows:
  the same loss and gradients (for q, k and the queue) as on one device."""
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  rng = np.random.default_rng(5)
  q = jnp.asarray(rng.normal(size=(32, 8)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(32, 8)), jnp.float32)
  queue = jnp.asarray(_unit_rows(rng, (64, 8)), jnp.float32)

  def replica_loss(q, k, queue):
    return losses.info_nce(q, k, queue, 0.07, axis_name='data')

  sharded = jax.jit(jax.shard_map(
      jax.value_and_grad(replica_loss, argnums=(0, 1, 2)), mesh=mesh,
      in_specs=(P('data'),) * 3, out_specs=(P(), (P('data'),) * 3)))
  loss8, grads8 = sharded(q, k, queue)
  loss1, grads1 = jax.value_and_grad(
      lambda q, k, queue: losses.info_nce(q, k, queue, 0.07), argnums=(0, 1, 2))(q, k, queue)
  np.testing.assert_allclose(loss8, loss1, rtol=1e-6)
  np.testing.assert_allclose(
      loss8, reference_info_nce(*map(np.asarray, (q, k, queue)), 0.07), rtol=1e-5)
  for got, want in zip(grads8, grads1):
    assert np.abs(want).max() > 0
    tolerances.assert_close(got, want, rtol=1e-5)   # 8 vs 1 device: tests/tolerances.py


def test_sharded_cross_entropy_with_masked_shards():
  """A device whose columns are all masked contributes nothing (no NaN)."""
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  rng = np.random.default_rng(6)
  positive = jnp.asarray(rng.normal(size=(5,)), jnp.float32)
  negatives = jnp.asarray(rng.normal(size=(5, 16)) * 5, jnp.float32)
  keep = np.zeros((5, 16), bool)
  keep[:, 3:6] = True          # only device 1 (columns 2-3) and 2 (4-5) have negatives
  fn = jax.jit(jax.shard_map(
      lambda p, n, m: losses.sharded_cross_entropy(p, n, 'data', m), mesh=mesh,
      in_specs=(P(), P(None, 'data'), P(None, 'data')), out_specs=P()))
  got = fn(positive, negatives, jnp.asarray(keep))
  logits = np.concatenate([np.asarray(positive)[:, None], np.asarray(negatives)[:, 3:6]], 1)
  want = np.log(np.exp(logits).sum(1)) - logits[:, 0]
  np.testing.assert_allclose(got, want, rtol=1e-5)

"""NT-Xent against a loop-by-loop reference, and its per-replica form on 8 devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from contrastive import losses


def reference_nt_xent(z1, z2, temperature):
  """The SimCLR paper's definition, one anchor at a time, in float64 numpy."""
  z = np.concatenate([z1, z2]).astype(np.float64)
  z /= np.linalg.norm(z, axis=1, keepdims=True)
  n = len(z1)
  total = 0.0
  for i in range(2 * n):
    positive = (i + n) % (2 * n)
    others = [j for j in range(2 * n) if j != i]
    logits = np.array([z[i] @ z[j] / temperature for j in others])
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
  np.testing.assert_allclose(g1_8, g1, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(g2_8, g2, rtol=1e-5, atol=1e-7)

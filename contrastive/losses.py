"""Contrastive objectives, written per replica with named-axis collectives."""

import jax
import jax.numpy as jnp


def _l2_normalize(x, eps=1e-12):
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


def nt_xent(z1, z2, temperature: float, axis_name: str | None = None):
  """SimCLR's NT-Xent loss (normalised temperature-scaled cross-entropy).

  Args:
    z1, z2: ``[n, d]`` projections of the two views of the same ``n`` images, any
      scale: they are L2-normalised here.
    temperature: softmax temperature.
    axis_name: when called per replica (inside ``shard_map``), the mesh axis that
      splits the global batch. Negatives are then the views of the whole global
      batch, gathered across that axis, and the returned value is the loss of the
      global batch on every replica, so its gradient is the global gradient.

  Returns:
    The mean over all 2N anchors of the cross-entropy of the anchor's positive
    against the other 2N - 1 views (N the global batch size).
  """
  z1, z2 = _l2_normalize(z1), _l2_normalize(z2)
  n = z1.shape[0]
  if axis_name is None:
    all1, all2, offset = z1, z2, 0
  else:
    all1 = jax.lax.all_gather(z1, axis_name, tiled=True)
    all2 = jax.lax.all_gather(z2, axis_name, tiled=True)
    offset = jax.lax.axis_index(axis_name) * n
  candidates = jnp.concatenate([all1, all2], axis=0)        # [2N, d]
  global_n = all1.shape[0]

  anchors = jnp.concatenate([z1, z2], axis=0)               # [2n, d]
  logits = anchors @ candidates.T / temperature             # [2n, 2N]
  rows = jnp.arange(n) + offset
  self_index = jnp.concatenate([rows, rows + global_n])
  positive_index = jnp.concatenate([rows + global_n, rows])
  columns = jnp.arange(2 * global_n)
  logits = jnp.where(columns[None, :] == self_index[:, None], -jnp.inf, logits)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  loss = -jnp.mean(jnp.take_along_axis(log_probs, positive_index[:, None], axis=-1))
  if axis_name is not None:
    loss = jax.lax.pmean(loss, axis_name)
  return loss

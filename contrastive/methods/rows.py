"""Tables with one row per training image, split by rows across the devices.

A memory bank or an instance classifier has N rows; device d of n holds rows
``[d R, (d + 1) R)`` with ``R = ceil(N / n)`` (the last rows of the last shard are
padding, never used). Rows are addressed by their global index, the same on every
device: each device reads and writes only the rows it owns, and the results are
combined with one collective, so they do not depend on the number of devices.
All functions run per replica; ``axis_name`` None means one device.
"""

import jax
import jax.numpy as jnp


def padded_rows(num_rows: int, num_devices: int) -> int:
  """Rows of the sharded table: ``num_rows`` rounded up to the device count."""
  return -(-num_rows // num_devices) * num_devices


def shard_position(shard, axis_name):
  """(this device's index, rows per shard)."""
  device = 0 if axis_name is None else jax.lax.axis_index(axis_name)
  return device, shard.shape[0]


def gather(x, axis_name):
  """Every device's ``x`` concatenated in device order (the global batch)."""
  return x if axis_name is None else jax.lax.all_gather(x, axis_name, tiled=True)


def shard_columns(shard, axis_name):
  """The global indices of this device's rows."""
  device, rows = shard_position(shard, axis_name)
  return device * rows + jnp.arange(rows)


def owned(global_rows, shard, axis_name):
  """Which of ``global_rows`` this device's shard holds, and their local positions."""
  device, rows = shard_position(shard, axis_name)
  local = global_rows - device * rows
  mine = (local >= 0) & (local < rows)
  return mine, jnp.clip(local, 0, rows - 1)


def read(shard, global_rows, axis_name):
  """The rows at ``global_rows`` (the same indices on every device), on every device."""
  mine, local = owned(global_rows, shard, axis_name)
  values = shard[local]
  values = jnp.where(mine.reshape(mine.shape + (1,) * (values.ndim - 1)), values, 0)
  return values if axis_name is None else jax.lax.psum(values, axis_name)


def write(shard, global_rows, values, axis_name, keep=None):
  """``shard`` with the rows it owns among ``global_rows`` set to ``values``.

  ``global_rows`` and ``values`` are the same on every device (gathered);
  ``keep`` (boolean, optional) drops rows such as padding.
  """
  mine, local = owned(global_rows, shard, axis_name)
  if keep is not None:
    mine = mine & keep
  # Rows another device owns are written out of range, and dropped.
  return shard.at[jnp.where(mine, local, shard.shape[0])].set(values, mode='drop')


def nearest_rows(shard, k: int, num_rows: int, axis_name, chunk: int = 1024):
  """For each row of this device's shard, its ``k`` most similar other rows.

  Similarity is the dot product (pass L2-normalised rows for cosine). The shards
  travel round the ring of devices (``ppermute``), and each visiting shard is
  scored in chunks of ``chunk`` rows, so a device holds its shard, one visiting
  shard and an ``[R, chunk]`` block of scores, never the ``[N, N]`` matrix. Ties
  go to the lower global index, as a stable sort of the whole row would give.

  Args:
    shard: ``[R, d]``, this device's rows.
    k: neighbours per row; at most ``num_rows - 1``.
    num_rows: N, the real rows (the padding after them is never a neighbour).
    axis_name: the mesh axis the table is split over; None for one device.
    chunk: rows of the visiting shard scored at a time.

  Returns:
    ``([R, k] int32 global indices, [R, k] float32 similarities)``, most similar
    first.
  """
  rows, dim = shard.shape
  devices = 1 if axis_name is None else jax.lax.axis_size(axis_name)
  device, _ = shard_position(shard, axis_name)
  own = shard_columns(shard, axis_name)
  chunk = min(chunk, rows)
  chunks = -(-rows // chunk)
  padded = jnp.pad(shard, ((0, chunks * chunk - rows), (0, 0)))
  big = jnp.iinfo(jnp.int32).max

  def merge(best, scores, columns):
    """The best ``k`` of the kept ones and a block, ordered by (-score, index)."""
    values, positions = jax.lax.top_k(scores, min(k, scores.shape[1]))
    candidates = (jnp.concatenate([best[0], -values], axis=1),
                  jnp.concatenate([best[1], columns[positions]], axis=1))
    ordered = jax.lax.sort(candidates, dimension=1, num_keys=2)
    return ordered[0][:, :k], ordered[1][:, :k]

  def score_shard(best, visiting, owner):
    def score_chunk(best, c):
      block = jax.lax.dynamic_slice_in_dim(visiting, c * chunk, chunk)
      offset = c * chunk + jnp.arange(chunk)
      columns = owner * rows + offset
      valid = (offset < rows) & (columns < num_rows)
      scores = shard.astype(jnp.float32) @ block.astype(jnp.float32).T
      scores = jnp.where(valid[None, :] & (columns[None, :] != own[:, None]),
                         scores, -jnp.inf)
      return merge(best, scores, columns.astype(jnp.int32)), None
    best, _ = jax.lax.scan(score_chunk, best, jnp.arange(chunks))
    return best

  # Kept as (-similarity, index) so that one ascending sort orders both keys.
  best = (jnp.full((rows, k), jnp.inf, jnp.float32), jnp.full((rows, k), big, jnp.int32))
  if axis_name is None:
    best = score_shard(best, padded, 0)
  else:
    best = jax.lax.pcast(best, (axis_name,), to='varying')   # each device's own rows
    ring = [(i, (i - 1) % devices) for i in range(devices)]

    def ring_step(carry, hop):
      best, visiting = carry
      best = score_shard(best, visiting, (device + hop) % devices)
      return (best, jax.lax.ppermute(visiting, axis_name, ring)), None

    (best, _), _ = jax.lax.scan(ring_step, (best, padded), jnp.arange(devices))
  return best[1], -best[0]

"""A memory bank: one stored embedding per training image, split across devices.

The instance-discrimination memory bank (Wu et al. 2018) and CMC's banks, one per
view, are this. The bank is split by rows (:mod:`contrastive.methods.rows`),
``ceil(N / n)`` per device, the last rows of the last shard padding that is
never read. A query's positive is its image's row; its negatives are rows drawn
uniformly as global indices, identical on every device (or the whole bank), never
the image's own row. Each device scores only the drawn rows it owns and the
softmax is combined across devices, so the loss does not depend on the device
count. After each step, every seen image's row becomes
``normalise(m * row + (1 - m) * new embedding)``.
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from contrastive import losses
from contrastive.methods import rows


class Negatives(NamedTuple):
  """The step's draws, the same rows in every bank split alike."""
  pick: Callable            # bank shard -> the negative rows this device holds
  mask: jax.Array           # [B, rows picked]: owned, real, not the image's own row
  batch_index: jax.Array    # [B]: the global batch's rows (gathered once)
  local_batch: int          # this replica's images: its part of the global batch


def init(key, num_examples: int, num_devices: int, dim: int):
  """``num_examples`` random unit rows, padded to a multiple of the device count
  (drawn for the real rows only: the same bank on any device count)."""
  embeddings = losses.l2_normalize(jax.random.normal(key, (num_examples, dim), jnp.float32))
  padding = rows.padded_rows(num_examples, num_devices) - num_examples
  return jnp.pad(embeddings, ((0, padding), (0, 0)))


def draw_negatives(key, layout, index, num_negatives: int, num_examples: int,
                   axis_name) -> Negatives:
  """``num_negatives`` rows drawn with ``key`` (0: the whole bank) for this
  replica's images at ``index``; ``layout`` is any bank shard, for its split."""
  batch_index = rows.gather(index, axis_name)                # [B]
  if num_negatives:
    drawn = jax.random.randint(key, (num_negatives,), 0, num_examples)
    owned, local_rows = rows.owned(drawn, layout, axis_name)
    negative_rows, pick = drawn, lambda bank: bank[local_rows]
  else:
    negative_rows = rows.shard_columns(layout, axis_name)
    owned, pick = negative_rows < num_examples, lambda bank: bank
  # An image's own row is its positive, never one of its negatives. The mask's
  # rows are the global batch's images, as the sharded softmax scores them.
  mask = owned[None, :] & (negative_rows[None, :] != batch_index[:, None])
  return Negatives(pick, mask, batch_index, index.shape[0])


def loss(queries, bank, negatives: Negatives, temperature: float, axis_name):
  """InfoNCE of this replica's ``queries`` against their images' rows of
  ``bank`` (no gradient) and its drawn rows. Every replica reads the whole
  batch's rows; each keeps its own images'."""
  device, _ = rows.shard_position(bank, axis_name)
  everything = rows.read(bank, negatives.batch_index, axis_name)
  n = negatives.local_batch
  positives = jax.lax.dynamic_slice_in_dim(everything, device * n, n)
  return losses.info_nce(queries, jax.lax.stop_gradient(positives), negatives.pick(bank),
                         temperature, axis_name=axis_name, negative_mask=negatives.mask)


def update(bank, index, embeddings, momentum: float, axis_name):
  """Each seen image's row <- normalise(m * row + (1 - m) * its new embedding);
  ``index`` and ``embeddings`` are this replica's (gathered here)."""
  index = rows.gather(index, axis_name)
  embeddings = rows.gather(embeddings, axis_name)
  _, local = rows.owned(index, bank, axis_name)
  mixed = momentum * bank[local] + (1.0 - momentum) * embeddings
  return rows.write(bank, index, losses.l2_normalize(mixed), axis_name)


def problems(num_negatives: int, momentum: float, negatives_field: str,
             momentum_field: str) -> list[str]:
  """The bank's config fields: draws per step and row momentum."""
  found = []
  if num_negatives < 0:
    found.append(f'config.{negatives_field}={num_negatives} must be >= 0 (0: the whole '
                 'bank).')
  if not 0.0 <= momentum < 1.0:
    found.append(f'config.{momentum_field}={momentum} must lie in [0, 1).')
  return found


def split_problems(field: str, num_negatives: int, num_examples: int,
                   whose: str = 'the bank') -> list[str]:
  """Draws from a bank no larger than them would count its rows several times over."""
  if num_negatives < num_examples:
    return []
  return [f'config.{field}={num_negatives} is not smaller than the training split '
          f'({num_examples} images): the draws would count rows of {whose} several times '
          f'over; use at most {num_examples - 1}, or 0 for the whole bank.']

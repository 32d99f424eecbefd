"""A queue of negative keys: one global FIFO ring split across devices by rows.

MoCo's queue, SimCLR v2's memory and CMC's per-view queues are all this. The
ring holds K keys, device d of n holding rows ``[d K/n, (d + 1) K/n)``; every
step the global batch's keys are gathered and each device writes those that fall
into its rows at the ring pointer, over the oldest. The queue, its order and its
checkpoint are therefore the same on any number of devices, and a run resumed on
another device count re-lays it out like any split array. K is a multiple of the
keys enqueued per step, so a step's keys never wrap around the ring.
"""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from contrastive import losses
from contrastive import parallel
from contrastive.methods import rows

POINTER = 'queue_pointer'


def random_keys(key, size: int, dim: int):
  """``size`` random unit vectors: the queue before any key is enqueued."""
  return losses.l2_normalize(jax.random.normal(key, (size, dim), jnp.float32))


def init_pointer():
  return jnp.zeros((), jnp.int32)


def specs(name: str = 'queue') -> dict:
  """The queue (or a dict of queues) at ``name`` split by rows; the pointer replicated."""
  return {name: P(parallel.AXIS), POINTER: P()}


def size_problems(field: str, size: int, per_step: int, described: str,
                  optional: bool = False) -> list[str]:
  """``config.<field>`` must be a positive multiple of the ``per_step`` keys
  enqueued per step (``described``: how they come about); 0 too if ``optional``."""
  if per_step <= 0 or (optional and size == 0) or (size > 0 and size % per_step == 0):
    return []
  allowed = '0 (no queue) or a positive' if optional else 'a positive'
  return [f'config.{field}={size} must be {allowed} multiple of the keys enqueued per '
          f'step, {described}; try {max(1, size // per_step) * per_step}.']


def split_problems(field: str, size: int, per_step: int, num_examples: int,
                   whose: str = 'the queue') -> list[str]:
  """A queue longer than the training split would hold keys of the very images in
  the batch: their positives would come back as negatives."""
  if size <= num_examples:
    return []
  fits = num_examples // per_step * per_step
  return [f'config.{field}={size} is larger than the training split ({num_examples} '
          f'images): {whose} would hold keys of the very images in the batch, positives '
          f'as negatives; use at most {fits}.']


def enqueue(queue, pointer, keys, axis_name, queue_size: int):
  """This device's rows of the global FIFO queue after the step's keys (this
  device's part of them; gathered here) are written at the ring ``pointer``,
  over the oldest keys; and the new pointer."""
  everything = rows.gather(keys, axis_name)
  positions = pointer + jnp.arange(everything.shape[0])   # never wraps: K % keys == 0
  queue = rows.write(queue, positions, everything.astype(queue.dtype), axis_name)
  return queue, (pointer + everything.shape[0]) % queue_size

"""Contrastive methods behind one small interface.

A method is a module with plain functions:

- ``build_model(config)``: its trained network (a Flax module returning encoder
  features and projections);
- ``init_method_state(config, variables, run, key)``: its state beyond the trained
  params and BN statistics (an EMA target tree, a queue, a memory bank; empty for
  SimCLR); ``variables`` holds the freshly initialised ``params`` and
  ``batch_stats``. It also checks the config against the run (clear errors).
- ``state_specs(config)``: how that state lies on the mesh, as a pytree prefix of
  ``PartitionSpec``: ``P()`` replicated, ``P('data')`` split by rows (queues, banks);
- ``loss(model, params, batch_stats, method_state, inputs, key, config, run,
  axis_name)``:
  the per-replica loss on ``inputs`` (``view1``, ``view2``: this replica's two
  augmented views; ``index``: each image's position in the training split), the
  same global-batch value on every replica; ``key`` is the step's randomness, the
  same on every replica. Returns ``(loss, aux)``, ``aux`` a dict of
  ``batch_stats`` (new BN statistics), ``for_update`` (what the state update needs
  from the forward pass: new keys, embeddings), ``metrics`` (extra scalars) and
  ``features`` (encoder features of ``view1``, for the online probe);
- ``update_method_state(method_state, params, for_update, step, config, run,
  axis_name)``: after the optimizer step (EMA target, enqueue, bank write);
- ``encode(model, params, batch_stats, images)``: encoder features for evaluation.

The trainer only talks to this interface, and everything a method owns lives in
:class:`TrainState`, so sharding, checkpoints and export treat all methods alike.
"""

from typing import Any, NamedTuple

import flax.struct
import jax

from contrastive.methods import membank
from contrastive.methods import moco
from contrastive.methods import simclr

METHODS = {'simclr': simclr, 'moco': moco, 'membank': membank}


class TrainState(flax.struct.PyTreeNode):
  """The whole state of a run: what a checkpoint holds."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  method_state: Any
  probe: Any            # online linear probe: params and optimizer state ({} when off)


class RunInfo(NamedTuple):
  """Facts about the run that a method's state depends on."""
  num_examples: int         # images in the training split (memory-bank rows)
  num_devices: int          # devices on the data axis (queue and bank shards)
  global_batch_size: int
  total_steps: int          # for schedules such as MoCo's cosine momentum


def get_method(name: str):
  if name not in METHODS:
    raise ValueError(f'config.method={name!r} is unknown; valid: {", ".join(METHODS)}')
  return METHODS[name]

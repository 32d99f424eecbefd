"""Contrastive methods behind one small interface.

A method is a module with plain functions:

- ``build_model(config)``: its network (a Flax module returning features and projections);
- ``init_method_state(config, params)``: extra state beyond params and BN statistics
  (an EMA target tree, a queue, a memory bank; empty for SimCLR);
- ``loss(model, params, batch_stats, method_state, views, config, axis_name)``: the
  per-replica loss on two batches of views, returning the global loss on every
  replica and ``(new_batch_stats, metrics)``;
- ``update_method_state(method_state, params, step, config)``: what changes after
  the optimizer step;
- ``encode(model, params, batch_stats, images)``: encoder features for evaluation.

The trainer only talks to this interface, and everything a method owns lives in
:class:`TrainState`, so sharding, checkpoints and export treat all methods alike.
"""

from typing import Any

import flax.struct
import jax

from contrastive.methods import simclr

METHODS = {'simclr': simclr}


class TrainState(flax.struct.PyTreeNode):
  """The whole state of a run: what a checkpoint holds."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  method_state: Any


def get_method(name: str):
  if name not in METHODS:
    raise ValueError(f'config.method={name!r} is unknown; valid: {", ".join(METHODS)}')
  return METHODS[name]

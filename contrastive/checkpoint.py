"""Orbax checkpoints of the whole :class:`TrainState`, and resume.

The state holds the step, parameters, BatchNorm statistics, optimizer state and
the method's own state (EMA targets, queues). No RNG state is stored: every random
draw of a step is derived from ``(config.seed, step)``, so the step is enough.
"""

import os

import jax
import orbax.checkpoint as ocp


def make_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), 'checkpoints'),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))


def restore_or_keep(manager: ocp.CheckpointManager, state):
  """The latest checkpoint restored onto ``state``'s shapes and shardings, or
  ``state`` itself when the workdir has none (a fresh run)."""
  step = manager.latest_step()
  if step is None:
    return state
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  return manager.restore(step, args=ocp.args.StandardRestore(abstract))


def save(manager: ocp.CheckpointManager, state) -> None:
  """Asynchronous save; the next save or :func:`finish` waits for it."""
  manager.save(int(jax.device_get(state.step)), args=ocp.args.StandardSave(state))


def finish(manager: ocp.CheckpointManager) -> None:
  manager.wait_until_finished()
  manager.close()

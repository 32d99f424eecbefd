"""Orbax checkpoints of the whole :class:`TrainState`, and resume.

The state holds the step, parameters, the networks' model state (BatchNorm
statistics), optimizer state and the method's own state (EMA targets, queues,
banks). No RNG state is stored: every
random draw of a step is derived from ``(config.seed, step)``, so the step is
enough. Beside the state (item ``default``) each checkpoint holds a small JSON
record (item ``run``): the device count it was written on and, for streamed data,
where each process's input stream stands.

A restart reads the newest checkpoint it can. One that cannot be read (a file
truncated or missing, metadata emptied) is moved aside into
``checkpoints_unreadable/`` and the one before it is tried, so a damaged save
never stops a run that has an older good one. A checkpoint whose arrays do not
match the state the config builds is a config error, never skipped. Checkpoints
written before the model state was generic hold the BatchNorm statistics at the
top of the state (``batch_stats``); they restore as that model state.
"""

import dataclasses
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

STATE, RUN = 'default', 'run'
UNREADABLE = 'checkpoints_unreadable'
MODEL_STATE = 'model_state'
LEGACY_STATISTICS = 'batch_stats'      # where older checkpoints keep the model state


def upgraded(tree: dict) -> dict:
  """A checkpoint's state tree in today's layout: an older one's top-level
  BatchNorm statistics become its ``model_state``."""
  if MODEL_STATE in tree or LEGACY_STATISTICS not in tree:
    return tree
  tree = dict(tree)
  statistics = tree.pop(LEGACY_STATISTICS)
  tree[MODEL_STATE] = {LEGACY_STATISTICS: statistics} if statistics else {}
  return tree


def _legacy_layout(state, directory, step) -> dict:
  """``state``'s fields as an older checkpoint holds them (statistics at the top)."""
  fields = {field.name: getattr(state, field.name) for field in dataclasses.fields(state)}
  model_state = fields.pop(MODEL_STATE)
  others = sorted(set(model_state) - {LEGACY_STATISTICS})
  if others:
    raise ValueError(f'The checkpoint of step {step} in {directory} predates model '
                     f'state other than BatchNorm statistics, which this config\'s model '
                     f'keeps ({", ".join(others)}): it cannot be resumed here; use a new '
                     '--workdir.')
  fields[LEGACY_STATISTICS] = model_state.get(LEGACY_STATISTICS, {})
  return fields


def _from_legacy_layout(restored: dict, state):
  fields = dict(restored)
  statistics = fields.pop(LEGACY_STATISTICS)
  return state.replace(**fields,
                       model_state={LEGACY_STATISTICS: statistics} if statistics else {})


def make_manager(directory: epath.Path, keep: int) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
      item_handlers={STATE: ocp.StandardCheckpointHandler(),
                     RUN: ocp.JsonCheckpointHandler()})


def save(manager: ocp.CheckpointManager, state, run: dict) -> None:
  """Asynchronous save of ``state`` and the ``run`` record; the next save or
  :func:`finish` waits for it."""
  manager.save(int(jax.device_get(state.step)), args=ocp.args.Composite(**{
      STATE: ocp.args.StandardSave(state), RUN: ocp.args.JsonSave(run)}))


def finish(manager: ocp.CheckpointManager) -> None:
  manager.wait_until_finished()
  manager.close()


class Restored(NamedTuple):
  state: Any
  run: dict          # the checkpoint's run record; {} for a fresh run


def restore_newest(manager: ocp.CheckpointManager, state, num_devices: int, say,
                   config_hint: str = '') -> Restored:
  """The newest readable checkpoint on ``state``'s shapes and shardings, or
  ``state`` itself when there is none (a fresh run).

  Rows of arrays split across devices are re-laid out when the checkpoint was
  written on another device count (tables padded to a multiple of it). A
  checkpoint whose arrays differ otherwise raises ValueError, ending with
  ``config_hint`` (what changed in the config).
  """
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      saved = manager.item_metadata(step)[STATE].tree
      run = manager.restore(step, args=ocp.args.Composite(**{RUN: ocp.args.JsonRestore()}))[RUN]
    except Exception as err:  # pylint: disable=broad-except
      _skip(manager, step, _describe(err), say)
      continue
    legacy = MODEL_STATE not in saved and LEGACY_STATISTICS in saved
    target = _legacy_layout(state, manager.directory, step) if legacy else state
    relaid = _check_shapes(saved, target, step, manager.directory,
                           num_devices != run.get('num_devices', num_devices), config_hint)
    reason = ''
    try:
      restored = manager.restore(step, args=ocp.args.Composite(**{
          STATE: ocp.args.StandardRestore(_restore_target(target, saved, relaid))}))[STATE]
    except Exception as err:  # pylint: disable=broad-except
      reason = _describe(err)
    # Every process must take the same checkpoint, or the next collective hangs.
    if not np.all(multihost_utils.process_allgather(np.asarray(not reason))):
      _skip(manager, step, reason or 'another process could not read it', say)
      continue
    if relaid:
      restored = _relayout(restored, target, relaid)
      say(f'The checkpoint of step {step} was written on {run["num_devices"]} device(s): '
          f'its split tables are re-laid out onto {num_devices}.')
    if legacy:
      restored = _from_legacy_layout(restored, state)
    return Restored(restored, run)
  return Restored(state, {})


def _describe(error: Exception) -> str:
  """An exception in one short line (Orbax's can run to many)."""
  lines = str(error).strip().splitlines()
  return f'{type(error).__name__}: {lines[0][:200]}' if lines else type(error).__name__


def _skip(manager, step: int, reason: str, say) -> None:
  """Moves an unreadable checkpoint out of the manager's way, keeping its files."""
  unreadable = epath.Path(manager.directory).parent / UNREADABLE
  aside, copies = unreadable / str(step), 0
  while aside.exists():                  # the same step skipped before: keep both
    copies += 1
    aside = unreadable / f'{step}.{copies}'
  multihost_utils.sync_global_devices(f'skip checkpoint {step}')
  if jax.process_index() == 0:
    unreadable.mkdir(parents=True, exist_ok=True)
    (epath.Path(manager.directory) / str(step)).rename(aside)
  multihost_utils.sync_global_devices(f'skipped checkpoint {step}')
  manager.reload()
  say(f'WARNING: skipping the checkpoint of step {step}: it cannot be read ({reason}). '
      f'Its files are kept in {aside}; trying the one before it.')


def _name(path) -> str:
  """'params/encoder/...': a leaf's path, the same for a state (attributes, named
  tuples) and for the dicts and lists of a checkpoint's metadata tree."""
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))))
                  for k in path)


def _leaves(tree) -> dict:
  """``{name: leaf}`` of a state or of a checkpoint's metadata tree."""
  flat, _ = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: hasattr(x, 'shape') and hasattr(x, 'dtype'))
  return {_name(path): leaf for path, leaf in flat}


def _check_shapes(saved, state, step, directory, devices_changed: bool,
                  config_hint: str) -> set:
  """The names of the split arrays to re-lay out; ValueError on any other mismatch."""
  saved, wanted = _leaves(saved), _leaves(state)
  problems, relaid = [], set()
  for name in sorted(saved.keys() | wanted.keys()):
    if name not in saved or name not in wanted:
      where = 'only the checkpoint' if name in saved else 'only this config'
      problems.append(f'{name} (in {where})')
      continue
    old, new = tuple(saved[name].shape), tuple(wanted[name].shape)
    if old == new:
      continue
    split = not wanted[name].sharding.is_fully_replicated
    if devices_changed and split and old[1:] == new[1:]:
      relaid.add(name)
    else:
      problems.append(f'{name} {old} in the checkpoint, {new} here')
  if problems:
    shown = problems[0] + (f' (and {len(problems) - 1} more arrays)' if len(problems) > 1
                           else '')
    raise ValueError(
        f'The checkpoint of step {step} in {directory} does not fit the state this config '
        f'builds: {shown}.{config_hint} Resume with the run\'s own config, or use a new '
        '--workdir.')
  return relaid


def _restore_target(state, saved, relaid: set):
  """``state``'s abstract arrays; re-laid-out tables at their saved shape, replicated."""
  saved = _leaves(saved)

  def target(path, leaf):
    name = _name(path)
    if name in relaid:
      replicated = jax.sharding.NamedSharding(leaf.sharding.mesh, jax.sharding.PartitionSpec())
      return jax.ShapeDtypeStruct(tuple(saved[name].shape), leaf.dtype, sharding=replicated)
    return ocp.utils.to_shape_dtype_struct(leaf)
  return jax.tree_util.tree_map_with_path(target, state)


def _relayout(restored, state, relaid: set):
  """Tables padded for another device count cut or zero-padded to this one's rows
  (the padding rows are never read) and split over this mesh."""
  def fit(path, value, leaf):
    name = _name(path)
    if name not in relaid:
      return value
    rows = leaf.shape[0]
    host = np.asarray(value.addressable_data(0))[:rows]
    host = np.concatenate([host, np.zeros((rows - len(host),) + host.shape[1:], host.dtype)])
    return jax.make_array_from_callback(leaf.shape, leaf.sharding, lambda index: host[index])
  return jax.tree_util.tree_map_with_path(fit, restored, state)

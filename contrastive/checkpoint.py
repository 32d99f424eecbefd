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

import contextlib
import dataclasses
import errno
import logging
import re
import sys
import threading
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging
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


class SaveFailed(OSError):
  """A checkpoint (or another file of the run) could not be written: the run stops
  rather than train on unsaved."""


# Causes of a failed save that the user can act on, by errno.
_CAUSES = {errno.ENOSPC: ('no space left on the device', 'Free space there'),
           errno.EDQUOT: ('disk quota exceeded', 'Free space there'),
           errno.EACCES: ('permission denied', 'Make the folder writable'),
           errno.EPERM: ('operation not permitted', 'Make the folder writable'),
           errno.EROFS: ('the file system is read-only', 'Give a writable --workdir')}


class Saves:
  """The run's asynchronous checkpoint saves, and their failures in one line.

  Orbax writes a checkpoint in a background thread; a failure there (a full
  disk, a lost permission, a bucket error) would only surface at the next save,
  possibly a thousand steps later. :meth:`check`, called after every step,
  raises it as :class:`SaveFailed` as soon as the thread has ended, naming the
  cause and the last good checkpoint. Orbax's own tracebacks of it stay out of
  the log unless ``--verbosity=1``.
  """

  def __init__(self, manager: ocp.CheckpointManager):
    self.manager = manager
    self._pending = None          # the step of the save in flight
    self._failed = False
    _quiet_orbax_save_errors()
    _quiet_late_noise()

  def save(self, state, run: dict) -> None:
    """Starts the save of ``state`` and the ``run`` record (after the one before)."""
    step = int(jax.device_get(state.step))
    with self._reported(self._pending):
      self.manager.wait_until_finished()
    with self._reported(step):
      self._pending = step
      self.manager.save(step, args=ocp.args.Composite(**{
          STATE: ocp.args.StandardSave(state), RUN: ocp.args.JsonSave(run)}))

  def check(self) -> None:
    if self._pending is not None:
      with self._reported(self._pending):
        self.manager.check_for_errors()

  def wait(self) -> None:
    """Waits for the save in flight to be complete on disk."""
    with self._reported(self._pending):
      self.manager.wait_until_finished()

  def finish(self) -> None:
    """Waits for the save in flight, then closes the manager."""
    with self._reported(self._pending):
      try:
        if not self._failed:
          self.manager.wait_until_finished()
      finally:
        self.manager.close()      # raises a failed save again

  @contextlib.contextmanager
  def _reported(self, step):
    try:
      yield
    except Exception as error:  # pylint: disable=broad-except
      self._failed = True
      directory = epath.Path(self.manager.directory)
      raise write_failure(f'The checkpoint of step {step} could not be written to '
                          f'{directory}', error, directory, step) from error


def write_failure(what: str, error: BaseException, directory: epath.Path,
                  step: int | None = None) -> SaveFailed:
  """``what`` failed because of ``error``: one line with the cause, the last good
  checkpoint in ``directory`` (before ``step``) and what to do."""
  _write_failed.set()
  cause, advice = _cause(error)
  good = [int(p.name) for p in directory.iterdir() if p.name.isdigit() and
          (step is None or int(p.name) < step)] if directory.is_dir() else []
  kept = (f'the last good checkpoint is step {max(good)} in {directory}' if good else
          'no checkpoint was saved before it')
  return SaveFailed(f'{what}: {cause}; {kept}, and training stopped. {advice}, then '
                    'run the same command to resume.')


def _cause(error: BaseException) -> tuple[str, str]:
  """What made a save fail, from the exception chain: an OSError's errno, or the
  one that TensorStore's errors quote (``[os_error_code='28']``)."""
  seen = error
  while seen is not None:
    code = seen.errno if isinstance(seen, OSError) else None
    quoted = re.search(r"os_error_code='?(\d+)", str(seen))
    code = code if code in _CAUSES else int(quoted.group(1)) if quoted else None
    if code in _CAUSES:
      return _CAUSES[code]
    seen = seen.__cause__ or seen.__context__
  return _describe(error), 'Fix the cause'


def _verbose() -> bool:
  return absl_logging.get_verbosity() >= absl_logging.DEBUG


class _QuietOrbaxSaveErrors(logging.Filter):
  """Drops the tracebacks that Orbax, and asyncio for Orbax's tasks, log of a failed
  background save (:class:`Saves` reports it in one line), unless the command runs
  with ``--verbosity=1``."""

  def filter(self, record: logging.LogRecord) -> bool:
    return (record.levelno < logging.ERROR or _verbose() or
            ('orbax' not in record.pathname and 'orbax' not in record.getMessage()))


def _quiet_orbax_save_errors():
  for name in ('absl', 'asyncio'):
    logger = logging.getLogger(name)
    if not any(isinstance(f, _QuietOrbaxSaveErrors) for f in logger.filters):
      logger.addFilter(_QuietOrbaxSaveErrors())


_write_failed = threading.Event()     # a write of this run failed (see write_failure)


def _is_late_noise(error: BaseException | None) -> bool:
  """What the libraries print around a failed write: TensorStore writes still in
  flight completing on Orbax's closed event loop; once a write failed, TensorBoard's
  writer thread and exit hook failing on the same full disk."""
  text = str(error)
  if isinstance(error, RuntimeError) and text == 'Event loop is closed':
    return True
  return _write_failed.is_set() and isinstance(error, OSError) and (
      error.errno in _CAUSES or text == 'handle is closed')


def _quiet_late_noise() -> None:
  """Keeps those tracebacks (printed through Python's exception hooks, from the
  libraries' own threads and at exit) off the console, which has the one-line
  error; ``--verbosity=1`` keeps them."""
  if getattr(sys.unraisablehook, 'quiet_late_noise', False):
    return
  excepthook, thread_hook, unraisable_hook = (sys.excepthook, threading.excepthook,
                                              sys.unraisablehook)

  def quiet_excepthook(kind, error, traceback):
    if _verbose() or not _is_late_noise(error):
      excepthook(kind, error, traceback)

  def quiet_thread_hook(arguments):
    if _verbose() or not _is_late_noise(arguments.exc_value):
      thread_hook(arguments)

  def quiet_unraisable_hook(unraisable):
    if _verbose() or not _is_late_noise(unraisable.exc_value):
      unraisable_hook(unraisable)

  quiet_unraisable_hook.quiet_late_noise = True
  sys.excepthook, threading.excepthook = quiet_excepthook, quiet_thread_hook
  sys.unraisablehook = quiet_unraisable_hook


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

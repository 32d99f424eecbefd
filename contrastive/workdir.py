"""A run's directory: checkpoints, metrics, ``config.json``, results, and its lock.

The workdir is a local folder or a bucket URL (``gs://bucket/run``): every file
goes through :mod:`contrastive.paths`. One trainer at a time: opening a workdir
takes its lock, and a second trainer on the same workdir refuses at once, before
it reads any data, instead of interleaving metrics and deleting checkpoints.
"""

import json
import os
import socket
import threading
import time
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from contrastive import checkpoint
from contrastive import metrics as metrics_lib
from contrastive import paths

say = metrics_lib.say

# A lock on a bucket (which has no locks) is a file whose owner rewrites its
# timestamp every HEARTBEAT_SECONDS; one older than STALE_SECONDS is a dead run's.
HEARTBEAT_SECONDS = 20
STALE_SECONDS = 60


class Resumed(NamedTuple):
  state: Any
  start_step: int     # 0 for a fresh run
  run: dict           # the checkpoint's run record (checkpoint.Saves.save); {} when fresh


class Workdir:
  """A run's directory, opened for one trainer.

  Opening it checks that it can be written, takes its lock and opens the metric
  files; use it as a context manager: on exit (an exception included, a kill not)
  the checkpoint in flight completes, the metric files close and the lock is
  released (a killed run's lock is released by the OS, or goes stale on a bucket).
  """

  def __init__(self, path: str, keep_checkpoints: int):
    self.path = paths.resolve(path)
    _check_writable(self.path)
    self._lock = _Lock(self.path)
    self.manager = checkpoint.make_manager(self.path / 'checkpoints', keep_checkpoints)
    self.saves = checkpoint.Saves(self.manager)
    self.writer = metrics_lib.MetricWriter(self.path)

  def __enter__(self):
    return self

  def __exit__(self, kind, error, traceback):
    # A full disk fails the last save and the closing writes too: the error in
    # flight already says why, and the lock is released whatever happens.
    failure = None
    for close in (self.saves.finish, self.writer.close):
      try:
        close()
      except OSError as err:
        failure = failure or err
    self._lock.release()
    if failure is not None and error is None:
      raise failure

  @property
  def checkpoints(self) -> epath.Path:
    return epath.Path(self.manager.directory)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def resume(self, state, config_record: dict) -> Resumed:
    """The newest readable checkpoint (or ``state`` for a new run), then
    ``config.json`` rewritten; warns when a resumed run's config differs from it."""
    changed = self._changed_fields(config_record) if self.manager.all_steps() else []
    if changed:
      say(f'WARNING: resuming with a config that differs from {self.path / "config.json"} '
          f'in: {", ".join(changed)}.')
    hint = f' The config differs from the run\'s in: {", ".join(changed)}.' if changed else ''
    state, run = checkpoint.restore_newest(self.manager, state, jax.device_count(), say, hint)
    start_step = int(jax.device_get(state.step))
    if start_step:
      say(f'Resuming from the checkpoint of step {start_step} in {self.checkpoints}.')
    if jax.process_index() == 0:
      paths.write_atomically(self.path / 'config.json', _to_json(config_record))
    return Resumed(state, start_step, run)

  def _changed_fields(self, record: dict) -> list[str]:
    path = self.path / 'config.json'
    if not path.exists():
      return []
    try:
      before = read_json_object(path, 'the config record')
    except ValueError as unreadable:
      say(f'WARNING: {unreadable} It is written again from this run\'s config.')
      return []
    before, after = _flatten(before), _flatten(json.loads(_to_json(record)))
    return sorted(key for key in before.keys() | after.keys()
                  if before.get(key) != after.get(key))

  def write_results(self, filename: str, step: int, results: dict, scalars: dict) -> None:
    """``results`` as ``filename`` (JSON) and ``scalars`` into the metrics at ``step``."""
    self.writer.write(step, scalars)
    if jax.process_index() == 0:
      paths.write_atomically(self.path / filename, json.dumps(results, indent=2))


def read_json_object(path: epath.Path, what: str) -> dict:
  """The JSON object in ``path``; ValueError naming the file when it is cut short,
  empty or of another shape (what a kill mid-write or another program leaves)."""
  try:
    value = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as err:
    raise ValueError(f'{path} cannot be read as {what} ({err}): it was cut short or '
                     'overwritten.') from err
  if not isinstance(value, dict):
    raise ValueError(f'{path} holds a JSON {type(value).__name__}, not {what} (an '
                     'object): it was overwritten.')
  return value


def config_record(config: ml_collections.ConfigDict) -> dict:
  """A config as ``config.json`` records it."""
  return json.loads(config.to_json_best_effort())


def _to_json(record: dict) -> str:
  return json.dumps(record, indent=2, sort_keys=True, default=str)


def _flatten(tree: dict, prefix: str = '') -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[prefix + key] = value
  return flat


def _check_writable(path: epath.Path) -> None:
  try:
    path.mkdir(parents=True, exist_ok=True)
    if not path.is_dir():
      raise NotADirectoryError('it is a file')
    probe = path / f'.write_test.{socket.gethostname()}.{os.getpid()}'
    probe.write_text('')
    probe.unlink()
  except OSError as err:
    raise ValueError(f'--workdir={path} cannot be used: {err.strerror or err}. Give a '
                     'directory this user can write.') from err


class _Lock:
  """The workdir's one-trainer lock, held by process 0 for all processes.

  Local disk: an ``flock`` on ``workdir/lock``, released by the OS when the
  process ends however it ends. A bucket has no locks: ``workdir/lock`` holds
  its owner and a timestamp that a thread rewrites every HEARTBEAT_SECONDS.
  """

  def __init__(self, path: epath.Path):
    self._file = path / 'lock'
    self._handle = None
    self._beating = None
    problem = ''
    if jax.process_index() == 0:
      problem = self._acquire_remote() if paths.is_url(path) else self._acquire_local()
    busy = multihost_utils.broadcast_one_to_all(np.asarray(bool(problem)))
    if busy:
      raise ValueError(problem or f'--workdir={path} is in use by another run (see '
                       'process 0\'s message).')

  @staticmethod
  def _owner() -> dict:
    return {'host': socket.gethostname(), 'pid': os.getpid(), 'time': time.time()}

  @staticmethod
  def _busy_message(file, owner: dict) -> str:
    started = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(owner.get('time', 0)))
    return (f'--workdir={file.parent} is in use by another trainer (pid {owner.get("pid")} '
            f'on {owner.get("host")}, since {started}): wait for it to end, or use another '
            f'--workdir. (Lock: {file}.)')

  def _acquire_local(self) -> str:
    import fcntl  # pylint: disable=import-outside-toplevel
    handle = open(self._file, 'a+')  # pylint: disable=consider-using-with
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      handle.seek(0)
      try:
        owner = json.loads(handle.read() or '{}')
      except json.JSONDecodeError:
        owner = {}
      handle.close()
      return self._busy_message(self._file, owner)
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps(self._owner()))
    handle.flush()
    self._handle = handle
    return ''

  def _acquire_remote(self) -> str:
    if self._file.exists():
      try:
        owner = json.loads(self._file.read_text())
      except (json.JSONDecodeError, OSError):
        owner = {}
      if time.time() - owner.get('heartbeat', 0) < STALE_SECONDS:
        return self._busy_message(self._file, owner)
    owner = self._owner()
    stop = threading.Event()

    def beat():
      self._file.write_text(json.dumps({**owner, 'heartbeat': time.time()}))

    def keep_beating():
      while not stop.wait(HEARTBEAT_SECONDS):
        beat()

    beat()
    thread = threading.Thread(target=keep_beating, daemon=True, name='workdir-lock')
    thread.start()
    self._beating = (stop, thread)
    return ''

  def release(self) -> None:
    if self._handle is not None:
      self._handle.close()              # closing the file drops the flock
      self._handle = None
    if self._beating is not None:
      stop, thread = self._beating
      stop.set()
      thread.join()
      self._file.unlink(missing_ok=True)
      self._beating = None

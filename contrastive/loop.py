"""The run loop that pretraining and downstream evaluation share.

Everything around a train step that does not depend on what is trained: the mesh
and batch checks, the optimizer and its schedule, and the loop itself (input from
the resume step on, step logging, divergence checks, checkpoint cadence, stopping
on a signal). The workdir is :mod:`contrastive.workdir`'s. ``train.py`` and
``downstream.py`` say only what they train and how they evaluate it.
"""

import collections
import os
import queue
import signal
import sys
import threading
import time
from typing import Callable, Iterator, NamedTuple

import jax
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils

from contrastive import checkpoint
from contrastive import metrics as metrics_lib
from contrastive import optim
from contrastive import parallel

say = metrics_lib.say


# ----------------------------------------------------------------------------- mesh

class Layout(NamedTuple):
  """The mesh and how the global batches split over it."""
  mesh: jax.sharding.Mesh
  local_batch: int          # this process's rows of a training batch
  per_device_batch: int
  eval_local_batch: int | None   # this process's rows of an evaluation batch


def layout(global_batch: int, eval_batch: int | None = None,
           eval_field: str = '') -> Layout:
  """A 'data' mesh over every device; clear errors for batches that do not divide
  (``eval_batch``, named ``eval_field`` in errors: only when there is evaluation)."""
  mesh = parallel.make_mesh()
  local = parallel.check_global_batch(global_batch, mesh)
  eval_local = (None if eval_batch is None else
                parallel.check_global_batch(eval_batch, mesh, eval_field))
  say(f'{jax.process_count()} process(es), {mesh.devices.size} device(s) '
      f'({jax.devices()[0].platform}); global batch {global_batch}.')
  return Layout(mesh, local, global_batch // mesh.devices.size, eval_local)


# ----------------------------------------------------------------------------- optimizer

class Optimizer(NamedTuple):
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  peak_lr: float


def total_steps(num_epochs: float, steps_per_epoch: float) -> int:
  return max(1, int(round(num_epochs * steps_per_epoch)))


def optimizer(optim_config: ml_collections.ConfigDict, global_batch: int,
              steps_per_epoch: float, num_steps: int) -> Optimizer:
  """The optimizer an ``optim`` config describes, its lr scaled by the batch."""
  peak_lr = optim.scaled_learning_rate(optim_config, global_batch)
  schedule = optim.schedule_from_config(optim_config, peak_lr, steps_per_epoch, num_steps)
  return Optimizer(optim.make_optimizer(optim_config, schedule), schedule, peak_lr)


# ----------------------------------------------------------------------------- loop

class Preempted(Exception):
  """The run was asked to stop (SIGTERM, Ctrl-C) and saved the step in flight."""

  def __init__(self, step: int, checkpoints):
    super().__init__(f'Stopped by a signal at step {step}; its checkpoint is in '
                     f'{checkpoints}. Run the same command again to resume from it.')
    self.step = step


class Preemption:
  """Turns SIGTERM (cloud preemption, SLURM) and Ctrl-C into "save and stop".

  On one process a handler notes the signal and, while steps are being taken,
  the loop stops after the step in flight and saves it. Where nothing is unsaved
  (before this run's first step: loading data, compiling; after its final save:
  the final evaluation) the process stops at once, and a second signal always
  stops it at once. Both are seen by a thread that reads Python's signal wakeup
  pipe, so they act even while the main thread is inside a long XLA call
  (compilation), where Python runs no handler until the call returns. On several
  processes JAX's distributed runtime catches SIGTERM and
  ``reached_preemption_sync_point`` makes every process agree on one step to
  save at. Entered around a whole command; outside it, nothing is ever signalled.
  """

  def __init__(self):
    self.signal = None
    self.stepping = False     # the loop took a step: a signal now saves it
    self.finished = False     # training ended and its last checkpoint is written
    self._previous = {}
    self._wakeup = None

  def __enter__(self):
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      for number in (signal.SIGTERM, signal.SIGINT):
        self._previous[number] = signal.signal(number, self._note)
      read, write = os.pipe()
      os.set_blocking(write, False)
      self._wakeup = (signal.set_wakeup_fd(write, warn_on_full_buffer=False), write)
      threading.Thread(target=self._watch, args=(read,), daemon=True,
                       name='signal-watch').start()
    return self

  def _note(self, number, frame):
    del frame
    self.signal = signal.Signals(number).name

  def _watch(self, read: int):
    """Stops the process at once where a signal has nothing to save."""
    seen = 0
    with os.fdopen(read, 'rb', buffering=0) as pipe:
      while received := pipe.read(1):
        if received[0] not in self._previous:
          continue
        seen += 1
        name = signal.Signals(received[0]).name
        if seen > 1:
          _stop_now(f'{name} again: stopped at once, without saving the step in flight; '
                    'the same command resumes from the newest complete checkpoint.', 130)
        elif self.finished:
          _stop_now(f'Stopped by {name} after training ended (its checkpoints are '
                    'complete); run the same command again to evaluate.', 0)
        elif not self.stepping:
          _stop_now(f'Stopped by {name} before this run took a step: nothing new to '
                    'save. Run the same command again to resume.', 0)

  def __exit__(self, *exc):
    for number, handler in self._previous.items():
      signal.signal(number, handler)
    if self._wakeup is not None:
      previous, write = self._wakeup
      signal.set_wakeup_fd(previous)
      os.close(write)             # the watching thread reads the end and returns

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.signal is not None


def _stop_now(message: str, status: int):
  """Ends the process from any thread, now: no clean-up that could wait on XLA
  (the OS releases the workdir's lock; files are written whole or repaired)."""
  print(message, file=sys.stderr, flush=True)
  os._exit(status)  # pylint: disable=protected-access


class DivergenceGuard:
  """Finds the first step whose loss or gradient norm is not finite.

  The scalars of each step stay on the device until :meth:`check` (at log and
  checkpoint steps, and before every save), so there is no host sync per step, yet
  the step is named exactly and no checkpoint of a non-finite state is written.
  With ``skip_limit`` N > 0 the train step has skipped such updates itself: the
  run goes on, and stops only after more than N in a row.
  """

  def __init__(self, checkpoints, skip_limit: int):
    self._checkpoints, self._limit = checkpoints, skip_limit
    self._pending, self._streak = [], 0

  def add(self, step: int, scalars: dict) -> None:
    self._pending.append((step, {key: scalars[key] for key in ('loss', 'grad_norm')
                                 if key in scalars}))

  def check(self, last_checkpoint: int | None) -> None:
    pending, self._pending = jax.device_get(self._pending), []
    for step, figures in pending:
      if all(np.isfinite(value) for value in figures.values()):
        self._streak = 0
        continue
      self._streak += 1
      shown = ', '.join(f'{name} {float(figures[name])}' for name in ('loss', 'grad_norm')
                        if name in figures)
      if self._streak > self._limit:
        kept = ('no checkpoint was saved yet' if last_checkpoint is None else
                f'the last good checkpoint is step {last_checkpoint} in {self._checkpoints}')
        skipping = (f'{self._streak} steps in a row, more than '
                    f'config.skip_nonfinite_steps={self._limit}' if self._limit else
                    'set config.skip_nonfinite_steps=N to skip up to N such steps in a row')
        raise FloatingPointError(
            f'Training diverged at step {step} ({shown}); {kept}. Lower the learning rate '
            f'or check the data ({skipping}).')
      say(f'WARNING: step {step}: {shown}; its update was skipped ({self._streak} in a '
          f'row, at most {self._limit}).')


class DeviceBatches:
  """This process's host batches as global device arrays, ``size`` batches ahead.

  A background thread assembles each host batch (slicing in memory, or the
  tf.data stage) and starts its transfer to the devices while the steps before
  it run, so the step never waits for the host unless the host is slower than
  the devices. Yields ``(global batch, position)``: a streamed batch's stream
  position after its last example (None in memory), kept for the checkpoint and
  never sent to the devices. ``size=0`` assembles and transfers each batch when
  it is asked for, in the caller's thread. An exception in the thread (a broken
  source, an interrupt) is raised by the ``next`` that reaches it, after the
  batches read before it.
  """

  _DONE = object()

  def __init__(self, batches: Iterator[dict], mesh, size: int = 2):
    self._batches, self._mesh, self._size = batches, mesh, size
    self._stop = threading.Event()
    if size > 0:
      self._queue = queue.Queue(maxsize=size)
      self._thread = threading.Thread(target=self._produce, daemon=True,
                                      name='device-batches')
      self._thread.start()

  def _to_device(self, batch: dict):
    position = None
    if 'position' in batch:
      batch = dict(batch)
      position = int(batch.pop('position')[-1]) + 1
    return parallel.host_to_global(batch, self._mesh), position

  def _produce(self):
    try:
      for batch in self._batches:
        item = self._to_device(batch)
        while not self._put(item):
          if self._stop.is_set():
            return
      item = self._DONE
    except BaseException as error:  # pylint: disable=broad-except
      item = error        # KeyboardInterrupt too: the loop raises it, in order
    while not self._put(item) and not self._stop.is_set():
      pass

  def _put(self, item) -> bool:
    try:
      self._queue.put(item, timeout=0.1)
      return True
    except queue.Full:
      return False

  def __iter__(self):
    return self

  def __next__(self):
    if self._size == 0:
      return self._to_device(next(self._batches))
    item = self._queue.get()
    if item is self._DONE or isinstance(item, BaseException):
      self._queue.put(item)      # the next call ends (or fails) the same way
      if item is self._DONE:
        raise StopIteration
      raise item
    return item

  def close(self):
    """Stops the thread (a run that ends before its input does)."""
    self._stop.set()
    if self._size > 0:
      self._thread.join()


def train(workdir, state, train_step, batches: Iterator[dict], mesh, *,
          start_step: int, num_steps: int, steps_per_epoch: float, global_batch: int,
          log_every: int, checkpoint_every: int, preemption: Preemption,
          skip_nonfinite: int = 0, console=metrics_lib.CONSOLE,
          monitor: Callable[[int, object], dict] | None = None,
          epoch_start: Callable[[object], object] | None = None, prefetch: int = 2):
  """Runs ``train_step(state, batch) -> (state, scalars)`` up to ``num_steps``.

  ``batches`` yields this process's host batches from ``start_step`` on; they
  reach the devices through :class:`DeviceBatches`, ``prefetch`` ahead, and a
  streamed batch's ``position`` (each example's place in the process's input
  stream) is kept for the checkpoint, not sent to the devices.
  ``epoch_start(state) -> state`` runs before the first step of every epoch
  (also when a resumed run starts at one). After each step the scalars are logged
  (see :class:`metrics.StepLogger`) and checked (:class:`DivergenceGuard`,
  ``skip_nonfinite`` its limit), ``monitor(step, state)`` may return figures to
  record, and the state is checkpointed every ``checkpoint_every`` steps, at the
  end, and when ``preemption`` says a signal asked the run to stop (then
  :class:`Preempted` is raised). Returns the final state.

  Steps are dispatched without waiting for them: the loop reads no result of a
  step except at log, checkpoint and monitor steps. It waits only for the step
  ``prefetch + 1`` back to finish, which the devices reached long ago unless the
  host runs ahead, so that dispatched steps and their input batches do not pile
  up in device memory.
  """
  log = metrics_lib.StepLogger(workdir.writer, start_step, num_steps, global_batch,
                               steps_per_epoch, log_every, console=console)
  guard = DivergenceGuard(workdir.checkpoints, skip_nonfinite)
  device_batches = DeviceBatches(batches, mesh, prefetch)
  in_flight = collections.deque()     # the losses of the steps not yet waited for
  position = None
  try:
    for step in range(start_step, num_steps):
      asked = time.perf_counter()
      try:
        batch, batch_position = next(device_batches)
      except StopIteration:
        break
      input_seconds = time.perf_counter() - asked
      if batch_position is not None:
        position = batch_position
      if epoch_start is not None and step % steps_per_epoch == 0:
        state = epoch_start(state)
      preemption.stepping = True
      state, scalars = train_step(state, batch)
      in_flight.append(scalars['loss'])
      if len(in_flight) > prefetch + 1:
        in_flight.popleft().block_until_ready()
      done = step + 1
      guard.add(done, scalars)
      stop = preemption.reached(done)
      save = done % checkpoint_every == 0 or done == num_steps or stop
      if save or done % log_every == 0:
        guard.check(workdir.latest_step())
      log.after_step(done, scalars, input_seconds)
      figures = monitor(done, state) if monitor is not None else {}
      if figures:
        workdir.writer.write(done, figures)
        say(f'step {done}  ' + '  '.join(f'{name} {100 * value:.2f}%'
                                         for name, value in figures.items()))
      if save:
        workdir.saves.save(state, run_record(mesh, position))
      workdir.saves.check()
      if stop:
        raise Preempted(done, workdir.checkpoints)
    if start_step >= num_steps or done == num_steps:
      workdir.saves.wait()             # the final checkpoint is complete
      preemption.finished = True
  except metrics_lib.WriteFailed as failed:
    raise checkpoint.write_failure(failed.what, failed.cause,
                                   workdir.checkpoints) from failed
  finally:
    device_batches.close()
  return state


def run_record(mesh, position: int | None) -> dict:
  """What a checkpoint records besides the state: the device count, and each
  process's input-stream position (streamed data; None in memory)."""
  positions = None
  if position is not None:
    positions = [int(p) for p in np.ravel(
        multihost_utils.process_allgather(np.asarray(position, np.int64)))]
  return {'num_devices': int(mesh.devices.size), 'num_processes': jax.process_count(),
          'input_positions': positions}


def input_position(saved_run: dict, start_step: int, local_batch: int) -> int:
  """Where this process's streamed input resumes: the position its checkpoint
  recorded; on another process count (other blocks of the split), the position
  ``start_step`` batches into the new block's stream."""
  positions = saved_run.get('input_positions')
  if positions is not None and len(positions) == jax.process_count():
    return positions[jax.process_index()]
  if start_step:
    say(f'WARNING: the checkpoint records no input position for {jax.process_count()} '
        'process(es): the streamed input continues from the step count, not from the '
        'exact examples an uninterrupted run would read.')
  return start_step * local_batch

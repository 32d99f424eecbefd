"""Run metrics: JSON lines and TensorBoard in the workdir, console progress.

Only process 0 writes; the others get a writer that does nothing, so the trainer
never branches on the process index.
"""

import json
import math
import os
import time

import jax
from absl import logging

from contrastive import paths


def say(message: str) -> None:
  """Console output for people, from process 0 only."""
  if jax.process_index() == 0:
    print(message, flush=True)


class MetricWriter:
  """Appends ``{"step": s, **scalars}`` to ``metrics.jsonl`` and TensorBoard."""

  def __init__(self, workdir):
    self._active = jax.process_index() == 0
    self._jsonl = None
    self._tensorboard = None
    self._failed = False     # a write failed (a full disk): closing may fail too
    if not self._active:
      return
    workdir = paths.resolve(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    self._path = workdir / 'metrics.jsonl'
    # An object in a bucket cannot be appended to (some clients silently turn
    # 'a' into 'w'): on a URL the file is rewritten whole, its lines kept here.
    self._lines = None
    if paths.is_url(workdir):
      self._lines = self._path.read_text().splitlines(True) if self._path.exists() else []
    else:
      _drop_torn_last_line(self._path)
      self._jsonl = open(self._path, 'a', encoding='utf-8')  # pylint: disable=consider-using-with
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tensorboard = SummaryWriter(str(workdir / 'tensorboard'))
    except ImportError:
      logging.warning('tensorboardX is not installed: metrics go to metrics.jsonl only.')

  def write(self, step: int, scalars: dict):
    if not self._active:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    line = json.dumps({'step': int(step), **scalars}) + '\n'
    try:
      if self._lines is None:
        self._jsonl.write(line)
        self._jsonl.flush()
      else:
        self._lines.append(line)
        self._path.write_text(''.join(self._lines))
      if self._tensorboard is not None:
        for name, value in scalars.items():
          self._tensorboard.add_scalar(name, value, int(step))
        self._tensorboard.flush()
    except OSError as err:
      self._failed = True
      raise WriteFailed(f'{self._path} could not be written', err) from err
    if self._lines is None and os.fstat(self._jsonl.fileno()).st_nlink == 0:
      raise FileNotFoundError(
          f'{self._path} was deleted while the run trained (was the workdir '
          f'{self._path.parent} removed?); the run stops rather than train on with '
          'nowhere to keep its metrics and checkpoints.')

  def close(self):
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tensorboard is not None:
      try:
        self._tensorboard.close()
      except OSError:
        if not self._failed:    # after a failed write, closing fails the same way
          raise


class WriteFailed(OSError):
  """A metrics file could not be written (``what``: which; ``cause``: the OSError)."""

  def __init__(self, what: str, cause: OSError):
    super().__init__(f'{what}: {cause.strerror or cause}')
    self.what, self.cause = what, cause


def _drop_torn_last_line(path) -> None:
  """Cuts a last line that a kill or a full disk left unfinished, and says so, so
  that the lines appended next stay one record each. Reads only the file's end."""
  if not path.exists():
    return
  with open(path, 'rb+') as f:
    size = f.seek(0, os.SEEK_END)
    if not size:
      return
    end = size
    while end > 0:
      start = max(0, end - 65536)
      f.seek(start)
      chunk = f.read(end - start)
      if end == size and chunk.endswith(b'\n'):
        return
      newline = chunk.rfind(b'\n')
      if newline >= 0:
        end = start + newline + 1
        break
      end = start
    f.truncate(end)
  say(f'WARNING: the last line of {path} was cut short (a kill or a full disk while it '
      f'was written); dropped its {size - end} bytes.')


def read_metrics(workdir) -> dict[int, dict]:
  """All scalars of each step; where a resumed run rewrote a step, the later value.
  A line that is not a whole record (cut short by a kill) is skipped, with a warning."""
  records = {}
  path = paths.resolve(workdir) / 'metrics.jsonl'
  with path.open() as f:
    for number, line in enumerate(f, 1):
      try:
        record = json.loads(line)
        records.setdefault(record['step'], {}).update(record)
      except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        say(f'WARNING: {path} line {number} is not a whole record (cut short by a kill?); '
            'skipped it.')
  return records


class Progress:
  """Images/s and ETA over the interval since the last report."""

  def __init__(self, start_step: int, total_steps: int, global_batch: int):
    self._total = total_steps
    self._batch = global_batch
    self._last_step, self._last_time = start_step, time.perf_counter()
    self._figures = {'images_per_second': float('nan'), 'eta_seconds': float('nan'),
                     'interval_seconds': 0.0}

  def report(self, step: int) -> dict:
    """Figures since the last report; the last ones again if no step passed."""
    if step == self._last_step:
      return self._figures
    now = time.perf_counter()
    elapsed = now - self._last_time
    seconds_per_step = elapsed / (step - self._last_step)
    self._last_step, self._last_time = step, now
    self._figures = {'images_per_second': self._batch / seconds_per_step,
                     'eta_seconds': seconds_per_step * (self._total - step),
                     'interval_seconds': elapsed}
    return self._figures


# What the console line shows besides step, epoch, loss, images/s and ETA:
# (label, scalar, format) triples.
CONSOLE = (('lr', 'learning_rate', '.4g'),)


class StepLogger:
  """What a training loop does after each step.

  The first step (compilation included) is timed on its own, so it stays out of
  images/s and ETA. Every ``log_every`` steps, and at the last, the scalars are
  recorded with images/s, ETA and epoch, and one line is printed: step, epoch,
  loss, the ``console`` fields ((label, key, format) triples), images/s and ETA.
  (Whether they are finite is the loop's :class:`contrastive.loop.DivergenceGuard`'s
  concern, every step.)
  """

  def __init__(self, writer: MetricWriter, start_step: int, total_steps: int,
               global_batch: int, steps_per_epoch: float, log_every: int,
               console=CONSOLE):
    self._writer, self._start, self._total = writer, start_step, total_steps
    self._progress = Progress(start_step, total_steps, global_batch)
    self._steps_per_epoch, self._log_every = steps_per_epoch, log_every
    self._console = console
    self._input_seconds = 0.0

  def after_step(self, done: int, scalars: dict, input_seconds: float = 0.0) -> None:
    """``input_seconds``: how long the loop waited for this step's batch."""
    self._input_seconds += input_seconds
    if done == self._start + 1:
      jax.block_until_ready(scalars)
      seconds = self._progress.report(done)['interval_seconds']
      say(f'First step (compilation included) took {seconds:.1f} s.')
      self._input_seconds = 0.0
    if done % self._log_every and done != self._total:
      return
    progress = self._progress.report(done)
    # The share of the interval the loop spent waiting for input, not dispatching
    # steps: near 0 when the input stage keeps up with the devices.
    waiting = self._input_seconds / max(progress['interval_seconds'], 1e-9)
    self._input_seconds = 0.0
    scalars = {**jax.device_get(scalars), **progress, 'input_wait_fraction': waiting,
               'epoch': done / self._steps_per_epoch}
    self._writer.write(done, scalars)
    fields = ''.join(f'  {label} {scalars[key]:{fmt}}' for label, key, fmt in self._console)
    say(f'step {done}/{self._total}  epoch {scalars["epoch"]:.2f}  '
        f'loss {scalars["loss"]:.4f}{fields}  {scalars["images_per_second"]:.0f} img/s  '
        f'input wait {100 * waiting:.0f}%  ETA {format_duration(scalars["eta_seconds"])}')


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return '?'
  seconds = int(seconds)
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'

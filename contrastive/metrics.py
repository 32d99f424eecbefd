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


class MetricWriter:
  """Appends ``{"step": s, **scalars}`` to ``metrics.jsonl`` and TensorBoard."""

  def __init__(self, workdir: str):
    self._active = jax.process_index() == 0
    self._jsonl = None
    self._tensorboard = None
    if not self._active:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tensorboard = SummaryWriter(os.path.join(workdir, 'tensorboard'))
    except ImportError:
      logging.warning('tensorboardX is not installed: metrics go to metrics.jsonl only.')

  def write(self, step: int, scalars: dict):
    if not self._active:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({'step': int(step), **scalars}) + '\n')
    self._jsonl.flush()
    if self._tensorboard is not None:
      for name, value in scalars.items():
        self._tensorboard.add_scalar(name, value, int(step))
      self._tensorboard.flush()

  def close(self):
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tensorboard is not None:
      self._tensorboard.close()


def read_metrics(workdir: str) -> dict[int, dict]:
  """All scalars of each step; where a resumed run rewrote a step, the later value."""
  records = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      record = json.loads(line)
      records.setdefault(record['step'], {}).update(record)
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


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return '?'
  seconds = int(seconds)
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'

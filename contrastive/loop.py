"""The run loop that pretraining and downstream evaluation share.

Everything around a train step that does not depend on what is trained: the mesh
and batch checks, the optimizer and its schedule, the workdir (restore, the
config record, results, metrics) and the loop itself (input from the resume step
on, step logging, checkpoint cadence). ``train.py`` and ``downstream.py`` say
only what they train and how they evaluate it.
"""

import json
import os
from typing import Callable, Iterator, NamedTuple

import jax
import ml_collections
import optax

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


# ----------------------------------------------------------------------------- workdir

class Workdir:
  """A run's directory: checkpoints, metrics, ``config.json`` and results.

  A context manager: on exit (an exception included, a kill not) the checkpoint
  in flight completes and the metric files close.
  """

  def __init__(self, path: str, keep_checkpoints: int):
    self.path = path
    self.manager = checkpoint.make_manager(path, keep_checkpoints)
    self.writer = metrics_lib.MetricWriter(path)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    checkpoint.finish(self.manager)
    self.writer.close()

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def restore(self, state):
    """``(state, start_step)``: the latest checkpoint, or ``state`` for a new run."""
    state = checkpoint.restore_or_keep(self.manager, state)
    start_step = int(jax.device_get(state.step))
    if start_step:
      say(f'Resuming from the checkpoint of step {start_step} in {self.manager.directory}.')
    return state, start_step

  def record_config(self, record: dict, resumed: bool) -> None:
    """Writes ``config.json``; warns when a resumed run's config differs from it."""
    if jax.process_index() != 0:
      return
    path = os.path.join(self.path, 'config.json')
    text = json.dumps(record, indent=2, sort_keys=True, default=str)
    if resumed and os.path.exists(path):
      with open(path) as f:
        before = _flatten(json.load(f))
      after = _flatten(json.loads(text))
      changed = sorted(key for key in before.keys() | after.keys()
                       if before.get(key) != after.get(key))
      if changed:
        say(f'WARNING: resuming with a config that differs from {path} in: '
            f'{", ".join(changed)}.')
    with open(path, 'w') as f:
      f.write(text)

  def write_results(self, filename: str, step: int, results: dict, scalars: dict) -> None:
    """``results`` as ``filename`` (JSON) and ``scalars`` into the metrics at ``step``."""
    self.writer.write(step, scalars)
    if jax.process_index() == 0:
      with open(os.path.join(self.path, filename), 'w') as f:
        json.dump(results, f, indent=2)


def config_record(config: ml_collections.ConfigDict) -> dict:
  """A config as ``config.json`` records it."""
  return json.loads(config.to_json_best_effort())


def _flatten(tree: dict, prefix: str = '') -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[prefix + key] = value
  return flat


# ----------------------------------------------------------------------------- loop

def train(workdir: Workdir, state, train_step, batches: Iterator[dict], mesh, *,
          start_step: int, num_steps: int, steps_per_epoch: float, global_batch: int,
          log_every: int, checkpoint_every: int,
          console=metrics_lib.CONSOLE,
          monitor: Callable[[int, object], dict] | None = None,
          epoch_start: Callable[[object], object] | None = None):
  """Runs ``train_step(state, batch) -> (state, scalars)`` up to ``num_steps``.

  ``batches`` yields this process's host batches from ``start_step`` on.
  ``epoch_start(state) -> state`` runs before the first step of every epoch
  (also when a resumed run starts at one). After each step the scalars are logged
  (see :class:`metrics.StepLogger`), ``monitor(step, state)`` may return figures
  to record, and the state is checkpointed every ``checkpoint_every`` steps and
  at the end. Returns the final state.
  """
  log = metrics_lib.StepLogger(workdir.writer, start_step, num_steps, global_batch,
                               steps_per_epoch, log_every, workdir.manager.directory,
                               console=console)
  for step, batch in zip(range(start_step, num_steps), batches):
    if epoch_start is not None and step % steps_per_epoch == 0:
      state = epoch_start(state)
    state, scalars = train_step(state, parallel.host_to_global(batch, mesh))
    done = step + 1
    log.after_step(done, scalars)
    figures = monitor(done, state) if monitor is not None else {}
    if figures:
      workdir.writer.write(done, figures)
      say(f'step {done}  ' + '  '.join(f'{name} {100 * value:.2f}%'
                                       for name, value in figures.items()))
    if done % checkpoint_every == 0 or done == num_steps:
      checkpoint.save(workdir.manager, state)
  return state

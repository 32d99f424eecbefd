"""What a long run survives: damaged checkpoints, divergence, a busy or unusable
workdir, a changed config, another device count.

These tests drive the workdir, the checkpoints and the loop with a tiny state and
a fake train step, so they compile no network.
"""

import json
import os
import subprocess
import sys

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from contrastive import checkpoint
from contrastive import loop
from contrastive import parallel
from contrastive import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@flax.struct.dataclass
class TinyState:
  step: jax.Array
  weights: jax.Array      # replicated
  rows: jax.Array         # split by rows across the devices, like a bank


def _tiny_state(mesh, num_rows=16, width=4):
  state = TinyState(step=jnp.zeros((), jnp.int32), weights=jnp.ones((width,)),
                    rows=jnp.arange(num_rows * 3, dtype=jnp.float32).reshape(num_rows, 3))
  shardings = TinyState(step=parallel.replicated(mesh), weights=parallel.replicated(mesh),
                        rows=parallel.sharded(mesh))
  return jax.device_put(state, shardings)


def _fake_step(nan_at=None):
  """``(state, batch) -> (state, scalars)``: weights += mean(batch); the loss is
  NaN from step ``nan_at`` on (the state turns NaN too, as a diverged one does)."""
  @jax.jit
  def step(state, batch):
    done = state.step + 1
    bad = (done >= nan_at) if nan_at is not None else False
    weights = state.weights + jnp.mean(batch['x']) + jnp.where(bad, jnp.nan, 0.0)
    loss = jnp.sum(weights)
    return (state.replace(step=done, weights=weights),
            {'loss': loss, 'grad_norm': jnp.abs(loss)})
  return step


def _batches(local_batch=8):
  step = 0
  while True:
    yield {'x': np.full((local_batch,), step, np.float32)}
    step += 1


def _train(run_dir, state, step_fn, num_steps, **kwargs):
  options = dict(start_step=int(state.step), num_steps=num_steps, steps_per_epoch=100,
                 global_batch=8, log_every=1, checkpoint_every=2, console=(),
                 preemption=loop.Preemption())
  options.update(kwargs)
  return loop.train(run_dir, state, step_fn, _batches(), parallel.make_mesh(), **options)


def _saved_run(tmp_path, steps=4, keep=3):
  mesh = parallel.make_mesh()
  with workdir_lib.Workdir(str(tmp_path), keep) as run_dir:
    state, _, _ = run_dir.resume(_tiny_state(mesh), {'a': 1})
    _train(run_dir, state, _fake_step(), steps)
  return mesh


# ----------------------------------------------------------------------------- checkpoints

def _truncate_array_files(step_dir):
  """Every array data file cut to half, as an interrupted copy leaves them."""
  for root, _, names in os.walk(step_dir / 'default'):
    for name in names:
      if os.path.basename(root) == 'd':
        path = os.path.join(root, name)
        with open(path, 'r+b') as f:
          f.truncate(os.path.getsize(path) // 2)


def _delete_array_metadata(step_dir):
  os.remove(step_dir / 'default' / '_METADATA')


def _empty_array_metadata(step_dir):
  (step_dir / 'default' / '_METADATA').write_text('')


@pytest.mark.parametrize('damage', [_truncate_array_files, _delete_array_metadata,
                                    _empty_array_metadata])
def test_an_unreadable_newest_checkpoint_is_skipped_and_kept(tmp_path, capsys, damage):
  """The restart says which step it skips and why, moves its files aside, resumes
  from the one before, and saves that step again later without a clash."""
  mesh = _saved_run(tmp_path)
  damage(tmp_path / 'checkpoints' / '4')
  capsys.readouterr()
  with workdir_lib.Workdir(str(tmp_path), 3) as run_dir:
    state, start_step, _ = run_dir.resume(_tiny_state(mesh), {'a': 1})
    assert start_step == 2
    out = capsys.readouterr().out
    assert 'skipping the checkpoint of step 4: it cannot be read' in out
    assert 'Resuming from the checkpoint of step 2' in out
    assert (tmp_path / 'checkpoints_unreadable' / '4').is_dir()
    _train(run_dir, state, _fake_step(), 4)
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2', '4']


def test_every_checkpoint_unreadable_starts_afresh(tmp_path, capsys):
  mesh = _saved_run(tmp_path)
  for step in (2, 4):
    _delete_array_metadata(tmp_path / 'checkpoints' / str(step))
  with workdir_lib.Workdir(str(tmp_path), 3) as run_dir:
    _, start_step, _ = run_dir.resume(_tiny_state(mesh), {'a': 1})
  assert start_step == 0
  assert sorted(os.listdir(tmp_path / 'checkpoints_unreadable')) == ['2', '4']


def test_a_checkpoint_of_another_config_is_an_error_naming_arrays_and_fields(tmp_path,
                                                                             capsys):
  mesh = _saved_run(tmp_path)
  with workdir_lib.Workdir(str(tmp_path), 3) as run_dir:
    with pytest.raises(ValueError, match=r'step 4 .* weights \(4,\) in the checkpoint, '
                       r'\(5,\) here.* differs from the run\'s in: a\.'):
      run_dir.resume(_tiny_state(mesh, width=5), {'a': 2})
  assert 'resuming with a config that differs' in capsys.readouterr().out
  assert not (tmp_path / 'checkpoints_unreadable').exists()     # nothing was skipped


def test_split_rows_are_re_laid_out_for_another_device_count(tmp_path):
  """A table padded for 8 devices (16 rows) restored on a mesh of 3 (15 rows):
  the real rows arrive intact and split over the new mesh."""
  _saved_run(tmp_path)                                   # 8 devices, rows (16, 3)
  mesh3 = jax.make_mesh((3,), ('data',), devices=jax.devices()[:3],
                        axis_types=(jax.sharding.AxisType.Auto,))
  manager = checkpoint.make_manager(tmp_path / 'checkpoints', 3)
  try:
    state, run = checkpoint.restore_newest(manager, _tiny_state(mesh3, num_rows=15), 3,
                                           print)
  finally:
    manager.close()
  assert run['num_devices'] == 8 and int(state.step) == 4
  np.testing.assert_array_equal(state.rows, np.arange(45, dtype=np.float32).reshape(15, 3))
  assert state.rows.sharding == NamedSharding(mesh3, P('data'))


# ----------------------------------------------------------------------------- divergence

def test_divergence_is_caught_at_its_step_and_never_checkpointed(tmp_path):
  """NaN from step 7, logged every 20 and checkpointed every 5 with 2 kept: the
  error names step 7 and step 5, and no checkpoint after 5 exists."""
  mesh = parallel.make_mesh()
  with workdir_lib.Workdir(str(tmp_path), 2) as run_dir:
    state, _, _ = run_dir.resume(_tiny_state(mesh), {})
    with pytest.raises(FloatingPointError, match=r'diverged at step 7 .*last good '
                       r'checkpoint is step 5'):
      _train(run_dir, state, _fake_step(nan_at=7), 30, log_every=20, checkpoint_every=5)
  assert os.listdir(tmp_path / 'checkpoints') == ['5']


def test_skipped_non_finite_steps_stop_only_after_the_limit(tmp_path, capsys):
  """With a limit of 2, a step that stays non-finite is reported twice as skipped,
  then stops the run on the third in a row."""
  mesh = parallel.make_mesh()
  with workdir_lib.Workdir(str(tmp_path), 2) as run_dir:
    state, _, _ = run_dir.resume(_tiny_state(mesh), {})
    with pytest.raises(FloatingPointError, match=r'step 5 .*3 steps in a row, more than '
                       r'config.skip_nonfinite_steps=2'):
      _train(run_dir, state, _fake_step(nan_at=3), 30, skip_nonfinite=2)
  out = capsys.readouterr().out
  assert 'step 3: loss nan' in out and '(2 in a row, at most 2)' in out


# ----------------------------------------------------------------------------- workdir

def test_a_second_trainer_on_the_workdir_refuses(tmp_path):
  with workdir_lib.Workdir(str(tmp_path), 1):
    with pytest.raises(ValueError, match=r'is in use by another trainer \(pid '
                       f'{os.getpid()}'):
      workdir_lib.Workdir(str(tmp_path), 1)
  with workdir_lib.Workdir(str(tmp_path), 1):     # released on exit
    pass


def test_a_killed_trainers_lock_does_not_block_the_restart(tmp_path):
  """The OS drops the lock of a process killed with SIGKILL."""
  child = subprocess.Popen(
      [sys.executable, '-c', 'import sys, time; from contrastive import workdir; '
       f'w = workdir.Workdir({str(tmp_path)!r}, 1); print("locked", flush=True); '
       'time.sleep(600)'], stdout=subprocess.PIPE, text=True, cwd=REPO,
      env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu'))
  try:
    assert child.stdout.readline().strip() == 'locked'
    with pytest.raises(ValueError, match='in use by another trainer'):
      workdir_lib.Workdir(str(tmp_path), 1)
  finally:
    child.kill()
    child.wait()
  with workdir_lib.Workdir(str(tmp_path), 1):
    pass


def test_a_workdir_that_is_a_file_is_a_clear_error(tmp_path):
  path = tmp_path / 'run'
  path.write_text('not a directory')
  with pytest.raises(ValueError, match=f'--workdir={path} cannot be used'):
    workdir_lib.Workdir(str(path), 1)


@pytest.mark.skipif(os.geteuid() == 0, reason='root writes anywhere')
def test_an_unwritable_workdir_is_a_clear_error(tmp_path):
  os.chmod(tmp_path, 0o500)
  try:
    with pytest.raises(ValueError, match=f'--workdir={tmp_path / "run"} cannot be used'):
      workdir_lib.Workdir(str(tmp_path / 'run'), 1)
  finally:
    os.chmod(tmp_path, 0o700)


def test_config_json_is_written_and_a_changed_config_warns(tmp_path, capsys):
  _saved_run(tmp_path)
  assert json.loads((tmp_path / 'config.json').read_text()) == {'a': 1}
  mesh = parallel.make_mesh()
  with workdir_lib.Workdir(str(tmp_path), 3) as run_dir:
    run_dir.resume(_tiny_state(mesh), {'a': 1})
    assert 'WARNING' not in capsys.readouterr().out
  with workdir_lib.Workdir(str(tmp_path), 3) as run_dir:
    run_dir.resume(_tiny_state(mesh), {'a': 1, 'b': {'c': 2}})
  out = capsys.readouterr().out
  assert 'resuming with a config that differs from' in out and 'in: b.c.' in out


@pytest.mark.parametrize('field, value, message', [
    ('moco.queue_size', 2048, r'config.moco.queue_size=2048 is larger than the training '
                              r'split \(1297 images\).*use at most 1296'),
    ('membank.num_negatives', 1297, r'config.membank.num_negatives=1297 is not smaller '
                                    r'than the training split \(1297 images\)'),
])
def test_negatives_beyond_the_split_are_refused_before_compiling(config, tmp_path, field,
                                                                 value, message):
  from contrastive import train  # pylint: disable=g-import-not-at-top
  section, name = field.split('.')
  config.method = section
  config[section][name] = value
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, str(tmp_path))


# ----------------------------------------------------------------------------- a real run

def _losses(workdir):
  from contrastive import metrics  # pylint: disable=g-import-not-at-top
  return {step: record['loss'] for step, record in metrics.read_metrics(workdir).items()
          if 'loss' in record}


def test_sigterm_saves_the_step_in_flight_and_another_device_count_continues(
    config, tmp_path, monkeypatch):
  """MoCo (its queue split across devices) preempted by SIGTERM on 8 devices in
  this process (saving the step in flight), then in a real ``python -m
  contrastive.main`` on 4 devices before its first step (it stops at once, exit
  0, nothing to save), then finished by that command on 4. Every step's loss is the uninterrupted 8-device run's: the data
  order, the queue and the step count do not depend on the device count."""
  import signal  # pylint: disable=g-import-not-at-top
  from contrastive import train  # pylint: disable=g-import-not-at-top
  from contrastive.data import in_memory  # pylint: disable=g-import-not-at-top
  # Shuffle BN normalises keys per device, so its statistics depend on the device
  # count by design: the keys here use BN over the global batch. At the quickstart's
  # learning rate this tiny network is chaotic: the float32 rounding of 4 devices
  # against 8 (~2e-7 of the loss) grows to ~10% by step 12, by an amount that
  # depends on the CPU. At a tenth of it the difference stays ~1e-6, while one
  # update more or less still moves the loss by over 1%.
  overrides = {'method': 'moco', 'moco.queue_size': 32, 'moco.key_bn': 'global',
               'num_epochs': 0.15, 'checkpoint_every_steps': 100, 'optim.base_lr': 0.1}
  for key, value in overrides.items():
    section, _, name = key.rpartition('.')
    setattr(config[section] if section else config, name, value)
  train.train_and_evaluate(config, str(tmp_path / 'straight'))
  expected = _losses(tmp_path / 'straight')
  assert max(expected) == 12

  # 1. 8 devices, this process: the signal arrives while step 3's batch is drawn.
  real_batch = in_memory.InMemoryTrainData.batch

  def batch_and_signal(self, step):
    if step == 2:
      os.kill(os.getpid(), signal.SIGTERM)
    return real_batch(self, step)

  monkeypatch.setattr(in_memory.InMemoryTrainData, 'batch', batch_and_signal)
  # Without prefetch, so that the batch is drawn when its step asks for it (with
  # it, batches are drawn ahead in a thread: the real command below has it).
  config.data.prefetch = 0
  with pytest.raises(loop.Preempted, match='at step 3'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  monkeypatch.setattr(in_memory.InMemoryTrainData, 'batch', real_batch)
  config.data.prefetch = 2
  assert os.listdir(tmp_path / 'run' / 'checkpoints') == ['3']

  # 2. 4 devices, a real command: SIGTERM before its first step (still compiling)
  # stops it at once, with nothing new to save.
  flags = [f'--config.{path}={value}' for path, value in [
      ('global_batch_size', config.global_batch_size), ('log_every_steps', 1),
      ('model.name', config.model.name), ('model.width', config.model.width),
      ('head.out_dim', config.head.out_dim), ('data.image_size', config.data.image_size),
      ('eval.enabled', False), *overrides.items()]]

  def four_devices(signal_when_resuming: bool):
    child = subprocess.Popen(
        [sys.executable, '-m', 'contrastive.main', '--config=configs/quickstart.py',
         f'--workdir={tmp_path / "run"}', *flags], cwd=REPO, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env=dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS=os.environ['XLA_FLAGS'].replace(
            'device_count=8', 'device_count=4')))
    lines = []
    for line in child.stdout:
      lines.append(line)
      if signal_when_resuming and line.startswith('Resuming from the checkpoint of step 3'):
        child.send_signal(signal.SIGTERM)
    output = ''.join(lines)
    assert child.wait(timeout=300) == 0, output[-3000:]
    assert '4 device(s)' in output and 'Resuming from the checkpoint of step 3' in output
    return output

  output = four_devices(signal_when_resuming=True)
  assert 'Stopped by SIGTERM before this run took a step: nothing new to save' in output
  assert 'step 4/' not in output
  assert os.listdir(tmp_path / 'run' / 'checkpoints') == ['3']

  # 3. 4 devices again, to the end.
  four_devices(signal_when_resuming=False)
  resumed = _losses(tmp_path / 'run')
  assert sorted(resumed) == sorted(expected)
  # Steps 1-3 ran the same programs: equal. Steps 4-12 on 4 devices sum in another
  # order (float32 rounding, ~1e-6), which the later steps carry (at this learning
  # rate without growing much). Another batch, a stale queue or a skipped step
  # would show far more: the losses of successive batches here differ by 1-25%.
  steps = sorted(expected)
  np.testing.assert_array_equal([resumed[s] for s in steps[:3]],
                                [expected[s] for s in steps[:3]])
  np.testing.assert_allclose(resumed[4], expected[4], rtol=1e-5)
  np.testing.assert_allclose([resumed[s] for s in steps], [expected[s] for s in steps],
                             rtol=1e-3)
  # The queue (unit keys) and the EMA target end where the uninterrupted run's do,
  # up to that amplified rounding; a queue re-laid out in another order, or keys
  # of other batches, would differ by O(1).
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  final = [ocp.StandardCheckpointer().restore(
      tmp_path / run / 'checkpoints' / '12' / 'default')['method_state']
           for run in ('straight', 'run')]
  assert int(final[0]['queue_pointer']) == int(final[1]['queue_pointer']) == 12 * 16 % 32
  np.testing.assert_allclose(final[1]['queue'], final[0]['queue'], atol=1e-3)
  target = [f['target']['params']['head']['Dense_0']['kernel'] for f in final]
  np.testing.assert_allclose(target[1], target[0], atol=1e-4 * np.abs(target[0]).max())

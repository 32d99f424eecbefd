"""A workdir's files under faults: a full disk during a save, files cut short by a
kill, the workdir deleted while the run trains. Each ends in one line that names
the file and the cause, or is repaired with a warning; none loses a checkpoint.

Like tests/test_robustness.py these drive the loop with a tiny state and a fake
train step, so they compile no network.
"""

import json
import os
import shutil
import subprocess

import pytest

from contrastive import checkpoint
from contrastive import metrics
from contrastive import parallel
from contrastive import paths
from contrastive import reader
from contrastive import workdir as workdir_lib
from tests import test_robustness
from tests.test_robustness import _fake_step, _tiny_state, _train   # pylint: disable=protected-access


def _batches_calling(at_step: int, action):
  """The fake run's batches; ``action()`` runs when the batch of ``at_step`` is made."""
  for step, batch in enumerate(test_robustness._batches()):   # pylint: disable=protected-access
    if step == at_step:
      action()
    yield batch


@pytest.fixture(name='small_disk')
def fixture_small_disk(tmp_path):
  """A 4 MB tmpfs: a disk that fills up (where this machine lets a test mount one)."""
  mount = tmp_path / 'disk'
  mount.mkdir()
  result = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=4m', 'tmpfs', str(mount)],
                          capture_output=True, text=True, check=False)
  if result.returncode:
    pytest.skip(f'cannot mount a tmpfs here ({result.stderr.strip() or "not permitted"})')
  yield mount
  subprocess.run(['umount', '-l', str(mount)], check=False)


def _fill(folder):
  """Writes into ``folder`` until its disk has no space left."""
  with open(folder / 'filler', 'wb') as f:
    try:
      while True:
        f.write(b'\0' * 65536)
        f.flush()
    except OSError:
      pass


def test_a_full_disk_stops_the_run_at_the_save_that_fails(small_disk):
  """Checkpoints every 6 steps; the disk fills once step 6's is complete. The run
  stops in one line naming the cause and step 6, before the next save (step 18)
  that the failure used to surface at."""
  mesh = parallel.make_mesh()
  made = []

  def fill_after_the_first_save():
    while not (small_disk / 'run' / 'checkpoints' / '6').is_dir():
      pass
    _fill(small_disk)
    made.append(True)

  with pytest.raises(checkpoint.SaveFailed) as stopped:
    with workdir_lib.Workdir(str(small_disk / 'run'), 3) as run_dir:
      state, _, _ = run_dir.resume(_tiny_state(mesh), {})
      batches = _batches_calling(8, fill_after_the_first_save)
      options = dict(start_step=0, num_steps=40, steps_per_epoch=100, global_batch=8,
                     log_every=1, checkpoint_every=6, console=(),
                     preemption=test_robustness.loop.Preemption())
      test_robustness.loop.train(run_dir, state, _fake_step(), batches, mesh, **options)
  message = str(stopped.value)
  print(message)
  assert made and '\n' not in message
  assert 'no space left on the device' in message and 'training stopped' in message
  assert f'the last good checkpoint is step 6 in {small_disk / "run" / "checkpoints"}' in message
  assert (small_disk / 'run' / 'checkpoints' / '6').is_dir()
  with open(small_disk / 'run' / 'metrics.jsonl', 'rb') as f:
    written = [json.loads(line)['step'] for line in f.read().splitlines() if line.endswith(b'}')]
  assert max(written) < 18


def test_a_cut_config_record_is_rewritten_on_resume_and_named_when_read(tmp_path, capsys):
  test_robustness._saved_run(tmp_path)   # pylint: disable=protected-access
  record = tmp_path / 'config.json'
  record.write_text(record.read_text()[:7])          # a kill mid-write
  mesh = parallel.make_mesh()
  with workdir_lib.Workdir(str(tmp_path), 3) as run_dir:
    resumed = run_dir.resume(_tiny_state(mesh), {'a': 1})
  assert resumed.start_step == 4
  assert f'WARNING: {record} cannot be read as the config record' in capsys.readouterr().out
  assert json.loads(record.read_text()) == {'a': 1}

  record.write_text('')
  with pytest.raises(ValueError, match=f'^{record} cannot be read as the config of a '
                     'training run .* Running its training command again writes it anew'):
    reader.read_config(str(tmp_path))
  record.write_text('[1, 2]')
  with pytest.raises(ValueError, match=f'^{record} holds a JSON list, not the config'):
    reader.read_config(str(tmp_path))


def test_a_cut_metrics_line_is_dropped_on_resume_and_skipped_when_read(tmp_path, capsys):
  lines = tmp_path / 'metrics.jsonl'
  lines.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
  writer = metrics.MetricWriter(str(tmp_path))
  writer.write(2, {'loss': 1.5})
  writer.close()
  assert 'the last line of' in capsys.readouterr().out
  assert metrics.read_metrics(str(tmp_path)) == {1: {'step': 1, 'loss': 2.0},
                                                 2: {'step': 2, 'loss': 1.5}}
  lines.write_text('{"step": 1, "loss": 2.0}\n{"st\n{"step": 2, "loss": 1.5}\n')
  assert sorted(metrics.read_metrics(str(tmp_path))) == [1, 2]
  assert f'{lines} line 2 is not a whole record' in capsys.readouterr().out


def test_the_workdir_deleted_while_training_stops_the_run(tmp_path):
  mesh = parallel.make_mesh()
  run = tmp_path / 'run'
  with pytest.raises(FileNotFoundError, match='metrics.jsonl was deleted while the run '
                     'trained'):
    with workdir_lib.Workdir(str(run), 3) as run_dir:
      state, _, _ = run_dir.resume(_tiny_state(mesh), {})
      test_robustness.loop.train(
          run_dir, state, _fake_step(), _batches_calling(5, lambda: shutil.rmtree(run)),
          mesh, start_step=0, num_steps=40, steps_per_epoch=100, global_batch=8,
          log_every=1, checkpoint_every=1000, console=(),
          preemption=test_robustness.loop.Preemption())


def test_an_interrupted_atomic_write_leaves_the_old_file(tmp_path, monkeypatch):
  path = paths.resolve(tmp_path / 'eval.json')
  paths.write_atomically(path, '{"old": 1}')

  def killed(*_):
    raise KeyboardInterrupt
  monkeypatch.setattr(os, 'fsync', killed)      # stopped after writing, before renaming
  with pytest.raises(KeyboardInterrupt):
    paths.write_atomically(path, '{"new": 2}')
  assert json.loads(path.read_text()) == {'old': 1}


def test_a_cut_downstream_record_is_named_with_what_to_do(tmp_path):
  """A resumed downstream run reads the pretraining step it started from in its
  config.json: cut short, that is one line saying how to give the step."""
  from contrastive import config as config_lib  # pylint: disable=g-import-not-at-top
  from contrastive import downstream  # pylint: disable=g-import-not-at-top

  class Resumed:
    def latest_step(self):
      return 3

  config = config_lib.downstream_config()
  (tmp_path / 'config.json').write_text('{"pretrained_step": 1')
  with pytest.raises(ValueError, match=r'config.json cannot be read as the record of a '
                     r'downstream run .* give it as --config.pretrained_step to resume'):
    downstream._pretrained_step(config, Resumed(), str(tmp_path))   # pylint: disable=protected-access
  (tmp_path / 'config.json').write_text('{"pretrained_step": 1}')
  assert downstream._pretrained_step(config, Resumed(), str(tmp_path)) == 1   # pylint: disable=protected-access

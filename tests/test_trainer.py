"""End-to-end trainer: resume after a crash, 2 processes vs 1, input errors."""

import os
import re
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath

from contrastive import export
from contrastive import loop
from contrastive import metrics
from contrastive import train
from contrastive.data import in_memory as in_memory_data
from contrastive.data import sources
from tests import faults
from tests.remote_fs import fake_gcs, remote_fs  # noqa: F401  pylint: disable=unused-import

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _losses(workdir):
  return {step: record['loss'] for step, record in metrics.read_metrics(workdir).items()
          if 'loss' in record}


def _final_state(workdir, step):
  return ocp.StandardCheckpointer().restore(
      os.path.join(workdir, 'checkpoints', str(step), 'default'))


def test_resumed_run_reproduces_uninterrupted_run(config, tmp_path, monkeypatch):
  """A run killed mid-way and restarted with the same command gives the
  uninterrupted run's losses and final state: the instance classifier's sharded
  rows and the neighbours its labels use, with the prior and a neighbour search.
  (MoCo's queue and EMA target: test_robustness.py resumes MoCo on another device
  count.)"""
  config.method, config.optim.name = 'instance_cls', 'sgd'
  config.checkpoint_every_steps = 2
  config.instance_cls.smoothing = 0.2
  train.train_and_evaluate(config, str(tmp_path / 'straight'))
  expected = _losses(tmp_path / 'straight')
  total = max(expected)
  assert total >= 6

  with faults.killed_at_step(monkeypatch, in_memory_data.InMemoryTrainData, 5):
    train.train_and_evaluate(config, str(tmp_path / 'resumed'))
  assert set(_losses(tmp_path / 'resumed')) == {1, 2, 3, 4, 5}
  train.train_and_evaluate(config, str(tmp_path / 'resumed'))   # the same command again
  resumed = _losses(tmp_path / 'resumed')
  assert sorted(resumed) == sorted(expected)
  np.testing.assert_allclose([resumed[s] for s in sorted(resumed)],
                             [expected[s] for s in sorted(expected)], rtol=1e-6)
  checkpoints = os.listdir(tmp_path / 'resumed' / 'checkpoints')
  assert str(total) in checkpoints
  straight = _final_state(tmp_path / 'straight', total)
  again = _final_state(tmp_path / 'resumed', total)
  np.testing.assert_allclose(again['params']['classifier'],
                             straight['params']['classifier'], atol=1e-6)
  np.testing.assert_array_equal(again['method_state']['neighbours'],
                                straight['method_state']['neighbours'])
  assert np.any(straight['method_state']['neighbours'])        # the search ran
  # Export carries the backbone only: the classifier rows stay behind.
  export.export_flax(str(tmp_path / 'straight'), str(tmp_path / 'backbone.msgpack'))
  _, variables = export.load_flax_encoder(str(tmp_path / 'backbone.msgpack'))
  jax.tree.map(np.testing.assert_array_equal, variables['params'],
               straight['params']['encoder'])


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _overrides(config):
  """The tiny test config as command-line overrides of the quickstart file."""
  return [f'--config.{key}={value}' for key, value in [
      ('global_batch_size', config.global_batch_size), ('num_epochs', config.num_epochs),
      ('log_every_steps', 1), ('checkpoint_every_steps', 100),
      ('model.name', config.model.name), ('model.width', config.model.width),
      ('head.out_dim', config.head.out_dim), ('data.image_size', config.data.image_size),
      ('eval.enabled', False)]]


def test_two_processes_match_one_process_and_agree_on_a_preemption(
    config, remote_fs, pretrained_workdir):  # pylint: disable=redefined-outer-name
  """2 processes x 4 devices (gloo over loopback), their workdir in a bucket (a
  local GCS emulator), give the loss sequence of 1 x 8 (the shared tiny run of
  the unchanged test config). SIGTERM to one process makes both save the same
  step and exit 0; 1 process x 8 devices finishes the run from the bucket."""
  import signal  # pylint: disable=g-import-not-at-top
  expected = _losses(pretrained_workdir)
  assert len(expected) == 8

  port = _free_port()
  env = dict(remote_fs.env, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             PYTHONPATH=REPO)
  workdir = f'{remote_fs.url}/two'
  command = [sys.executable, '-m', 'contrastive.main',
             '--config=' + os.path.join(REPO, 'configs', 'quickstart.py'),
             '--workdir=' + workdir, '--distributed',
             f'--coordinator_address=localhost:{port}', '--num_processes=2',
             *_overrides(config)]
  processes = [subprocess.Popen(command + [f'--process_id={i}'], env=env, cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True) for i in range(2)]
  lines = []
  for line in processes[0].stdout:         # process 0 prints; process 1 gets the signal
    lines.append(line)
    if line.startswith('Training steps 0 -> 8'):
      processes[1].send_signal(signal.SIGTERM)
  outputs = [''.join(lines), processes[1].communicate(timeout=600)[0]]
  for p, output in zip(processes, outputs):
    assert p.wait(timeout=600) == 0, output[-3000:]
  stopped = [re.search(r'Stopped by a signal at step (\d+)', output) for output in outputs]
  assert all(stopped), outputs[1][-3000:]
  step = int(stopped[0].group(1))
  assert int(stopped[1].group(1)) == step and 1 <= step < 8
  assert [p.name for p in epath.Path(workdir, 'checkpoints').iterdir()] == [str(step)]

  config.checkpoint_every_steps = 100
  train.train_and_evaluate(config, workdir)     # 1 process x 8 devices
  got = _losses(workdir)
  assert sorted(got) == sorted(expected)
  np.testing.assert_allclose([got[s] for s in sorted(got)],
                             [expected[s] for s in sorted(expected)], rtol=1e-5)


def _run_main(*args):
  return subprocess.run([sys.executable, '-m', 'contrastive.main', *args],
                        capture_output=True, text=True, cwd=REPO, timeout=300,
                        env=dict(os.environ, PYTHONPATH=REPO))


def test_unknown_config_field_is_an_error(tmp_path):
  result = _run_main('--config=configs/quickstart.py', f'--workdir={tmp_path}',
                     '--config.optim.learning_rate=0.1')
  assert result.returncode == 1
  assert result.stderr.startswith("error: --config.optim.learning_rate=0.1: the config has "
                                  "no field 'learning_rate'")
  assert 'Traceback' not in result.stderr


def test_indivisible_batch_is_a_clear_error(tmp_path):
  result = _run_main('--config=configs/quickstart.py', f'--workdir={tmp_path}',
                     '--config.global_batch_size=250')
  assert result.returncode == 1
  assert 'config.global_batch_size=250' in result.stderr
  assert 'Traceback' not in result.stderr


@pytest.mark.parametrize('field, value, valid', [
    ('model.name', 'resnet19', 'resnet18'),
    ('method', 'swav', 'simclr'),
    ('data.source', 'hub', 'folder'),
    ('optim.name', 'lamb', 'lars'),
    ('model.stem', 'patch', 'cifar'),
])
def test_unknown_names_list_the_valid_ones(config, tmp_path, field, value, valid):
  section, _, name = field.rpartition('.')
  setattr(config[section] if section else config, name, value)
  with pytest.raises(ValueError, match=valid) as error:
    train.train_and_evaluate(config, str(tmp_path))
  assert value in str(error.value)


def _image_folder(root, classes=3, per_class=24, size=20):
  """Coloured squares whose class is their colour, plus one corrupt file."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for c in range(classes):
    os.makedirs(root / f'class{c}')
    for i in range(per_class):
      pixels = rng.integers(0, 60, (size, size, 3)) + np.eye(3, dtype=int)[c] * 190
      Image.fromarray(pixels.astype(np.uint8)).save(root / f'class{c}' / f'{i}.png')
  (root / 'class0' / 'broken.jpg').write_bytes(b'not an image at all')


def _folder_run(config, path, knn_every_epochs: float):
  """The tiny config on an image folder for one epoch, with kNN during and after."""
  config.data.source = 'folder'
  config.data.path = str(path)
  config.data.eval_crop_fraction = 1.0
  config.num_epochs = 1.0
  config.eval.enabled = True
  config.eval.compare_random_init = False
  config.eval.batch_size = 16
  config.eval.knn_k = 5
  config.eval.knn_every_epochs = knn_every_epochs
  return config


@pytest.mark.parametrize('in_memory', [True, False])
def test_image_folder_run_trains_and_evaluates(config, tmp_path, capsys, in_memory):
  _image_folder(tmp_path / 'images')
  _folder_run(config, tmp_path / 'images', 0.67)   # every 2 of the 3 steps, and at the end
  config.data.holdout_per_class = 4
  config.data.in_memory = in_memory
  results = train.train_and_evaluate(config, str(tmp_path / 'run'))
  # 3 classes x 20 training images (the corrupt file skipped), batch 16: 3 steps.
  assert sorted(_losses(tmp_path / 'run')) == [1, 2, 3]
  # Colour decides the class: any encoder separates it.
  assert results['trained']['knn_accuracy'] > 0.9
  records = metrics.read_metrics(tmp_path / 'run')
  monitored = sorted(step for step, r in records.items() if 'monitor/knn_accuracy' in r)
  assert monitored == [2, 3]
  assert 0 <= records[3]['monitor/online_probe_accuracy'] <= 1
  assert all(0 <= records[s]['online_probe_train_accuracy'] <= 1 for s in (1, 2, 3))
  assert results['trained']['online_probe_accuracy'] == pytest.approx(
      records[3]['monitor/online_probe_accuracy'])
  output = capsys.readouterr().out
  assert 'kNN top-1' in output
  if in_memory:
    assert '1 unreadable file(s) skipped' in output


def test_streamed_run_resumed_mid_epoch_sees_the_remaining_batches(config, tmp_path,
                                                                     monkeypatch):
  """A tf.data run on an image folder (one unreadable file) killed at step 5 of
  a 7-step epoch resumes from its step-4 checkpoint at the input position it
  recorded: the resumed losses are the uninterrupted run's, the next epoch too."""
  from contrastive.data import pipeline  # pylint: disable=g-import-not-at-top
  _image_folder(tmp_path / 'images', per_class=40)
  config.data.source, config.data.path = 'folder', str(tmp_path / 'images')
  config.data.in_memory, config.data.holdout_per_class = False, 0
  config.num_epochs, config.checkpoint_every_steps = 1.5, 4
  train.train_and_evaluate(config, str(tmp_path / 'straight'))
  expected = _losses(tmp_path / 'straight')
  assert max(expected) == 10                          # 121 files // 16 = 7 steps an epoch

  real_iterator = pipeline.train_iterator
  starts = []

  def dying_iterator(*args, **kwargs):
    starts.append(kwargs['start_position'])
    for number, batch in enumerate(real_iterator(*args, **kwargs)):
      if number == 5 and len(starts) == 1:
        raise KeyboardInterrupt('simulated kill')
      yield batch

  monkeypatch.setattr(pipeline, 'train_iterator', dying_iterator)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, str(tmp_path / 'resumed'))
  train.train_and_evaluate(config, str(tmp_path / 'resumed'))
  # 4 batches read 64 images: position 64, or 65 if the unreadable file was among them.
  assert starts[0] == 0 and starts[1] in (64, 65)
  resumed = _losses(tmp_path / 'resumed')
  assert sorted(resumed) == sorted(expected)
  np.testing.assert_allclose([resumed[s] for s in sorted(resumed)],
                             [expected[s] for s in sorted(expected)], rtol=1e-6)


def test_separate_evaluation_folder_serves_monitor_final_and_downstream(config, tmp_path):
  """train/ and val/ folders: training reads all of train/, and the kNN monitor,
  the final evaluation and contrastive.downstream read val/."""
  from contrastive import downstream  # pylint: disable=g-import-not-at-top
  from configs import linear_eval_simclr  # pylint: disable=g-import-not-at-top
  _image_folder(tmp_path / 'train')
  _image_folder(tmp_path / 'val', per_class=4)
  _folder_run(config, tmp_path / 'train', 0.5)
  config.data.eval_path = str(tmp_path / 'val')
  config.data.holdout_per_class = 0
  results = train.train_and_evaluate(config, str(tmp_path / 'run'))
  # All 72 readable training images, batch 16: 4 steps; the monitor every 2.
  assert sorted(_losses(tmp_path / 'run')) == [1, 2, 3, 4]
  records = metrics.read_metrics(tmp_path / 'run')
  assert sorted(s for s, r in records.items() if 'monitor/knn_accuracy' in r) == [2, 4]
  assert results['trained']['knn_accuracy'] > 0.9

  linear = linear_eval_simclr.get_config()
  linear.pretrained = str(tmp_path / 'run')
  linear.global_batch_size = 16
  linear.num_epochs = 0.5
  linear.eval_batch_size = 16
  figures = downstream.train_and_evaluate(linear, str(tmp_path / 'linear'))
  assert figures['num_eval_images'] == 12                # val/: 3 classes x 4
  assert figures['num_train_images'] == 72


@pytest.mark.parametrize('in_memory', [True, False])
def test_data_pass_visits_every_readable_training_image_once(config, tmp_path, in_memory):
  """The ordered pass a method initialises from (the contrastive prior): each
  readable image once, under the index its training batches carry; the
  corrupt file is skipped."""
  _image_folder(tmp_path / 'images')
  config = _folder_run(config, tmp_path / 'images', 0)
  config.data.holdout_per_class = 4
  config.data.in_memory = in_memory
  layout = loop.layout(config.global_batch_size)
  data = (in_memory_data.InMemoryTrainData(config.data, layout.mesh,
                                            layout.per_device_batch, config.seed)
          if in_memory else None)
  batches = list(train.data_pass(config, layout, data))
  index = np.concatenate([b['index'][b['mask']] for b in batches])
  assert all(b['image'].shape[0] == layout.local_batch for b in batches)
  listed = sources.split_info(config.data, 'train').num_examples      # 3 x 20 + broken
  assert len(index) == len(set(index)) == listed - 1
  if in_memory:
    np.testing.assert_array_equal(np.sort(index), np.arange(data.num_examples))
  else:
    assert index.max() < listed

"""A run whose workdir is a bucket URL: ``gs://`` served by a local GCS emulator
(``tests/remote_fs.py``), through the same clients a TPU pod uses (TensorFlow's
GCS filesystem under epath, TensorStore's GCS driver under Orbax). The two-process
run on a bucket is in ``test_trainer.py``."""

import os

import jax
import numpy as np
from etils import epath

from contrastive import downstream
from contrastive import export
from contrastive import reader
from contrastive import metrics
from contrastive import train
from contrastive.data import in_memory
from tests import faults
from tests.remote_fs import fake_gcs, remote_fs  # noqa: F401  pylint: disable=unused-import

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _losses(workdir):
  return {step: record['loss'] for step, record in metrics.read_metrics(workdir).items()
          if 'loss' in record}


def test_train_resume_downstream_and_export_on_a_bucket(config, remote_fs, monkeypatch,  # pylint: disable=redefined-outer-name
                                                        pretrained_workdir, capsys):
  """Killed at step 5, resumed from the bucket's step-4 checkpoint with the
  uninterrupted run's losses; then linear evaluation of the bucket's run into
  the bucket, and an export to and from the bucket. Nothing lands on local disk."""
  run = f'{remote_fs.url}/run'
  config.checkpoint_every_steps = 4
  with faults.killed_at_step(monkeypatch, in_memory.InMemoryTrainData, 5):
    train.train_and_evaluate(config, run)
  stored = remote_fs.object_names()
  assert 'run/config.json' in stored and 'run/metrics.jsonl' in stored
  assert any(name.startswith('run/checkpoints/4/default/') for name in stored)
  capsys.readouterr()
  train.train_and_evaluate(config, run)
  assert f'Resuming from the checkpoint of step 4 in {run}/checkpoints' in capsys.readouterr().out
  expected = _losses(pretrained_workdir)          # the same tiny config, uninterrupted
  got = _losses(run)
  assert sorted(got) == sorted(expected)
  np.testing.assert_allclose([got[s] for s in sorted(got)],
                             [expected[s] for s in sorted(expected)], rtol=1e-6)

  from configs import linear_eval_simclr  # pylint: disable=g-import-not-at-top
  linear = linear_eval_simclr.get_config()
  linear.pretrained = run
  linear.global_batch_size, linear.eval_batch_size, linear.num_epochs = 16, 64, 0.1
  figures = downstream.train_and_evaluate(linear, f'{remote_fs.url}/linear')
  assert figures['pretrained'] == run and figures['backbone_unchanged']
  assert 'linear/downstream.json' in remote_fs.object_names()

  export.export_flax(run, f'{remote_fs.url}/backbone.msgpack')
  _, variables = export.load_flax_encoder(f'{remote_fs.url}/backbone.msgpack')
  jax.tree.map(np.testing.assert_array_equal, variables,
               reader.load_pretrained(run).variables)
  # No URL was taken for a local path (os.path.abspath('gs://b') is ./gs:/b).
  assert not any(os.path.exists(os.path.join(where, 'gs:')) for where in (REPO, os.getcwd()))
  assert not epath.Path(f'{remote_fs.url}/run/lock').exists()        # released

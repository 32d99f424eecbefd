"""Checkpoints of the layout before the model state was generic: BatchNorm
statistics at the top of the state (``batch_stats``), as every run written by
earlier versions holds them. They resume, and export, as the same run written
today does; a config whose model keeps other state refuses them in one line."""

import json
import os
import shutil

import numpy as np
import orbax.checkpoint as ocp
import pytest

from contrastive import checkpoint
from contrastive import metrics
from contrastive import reader
from contrastive import train
from tests import test_train_step
from tests.conftest import tiny_config


def _older_layout(workdir: str, to: str) -> None:
  """``workdir``'s run with its checkpoint rewritten in the older layout."""
  os.makedirs(to)
  shutil.copy(os.path.join(workdir, 'config.json'), to)
  manager = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'),
                                  item_handlers={checkpoint.STATE: ocp.StandardCheckpointHandler(),
                                                 checkpoint.RUN: ocp.JsonCheckpointHandler()})
  step = manager.latest_step()
  restored = manager.restore(step, args=ocp.args.Composite(**{
      checkpoint.STATE: ocp.args.StandardRestore(), checkpoint.RUN: ocp.args.JsonRestore()}))
  manager.close()
  state = dict(restored[checkpoint.STATE])
  assert set(state.pop('model_state')) == {'batch_stats'}
  state['batch_stats'] = restored[checkpoint.STATE]['model_state']['batch_stats']
  older = checkpoint.make_manager(os.path.join(os.path.abspath(to), 'checkpoints'), 2)
  older.save(step, args=ocp.args.Composite(**{
      checkpoint.STATE: ocp.args.StandardSave(state),
      checkpoint.RUN: ocp.args.JsonSave(restored[checkpoint.RUN])}))
  older.wait_until_finished()
  older.close()


def test_an_older_checkpoint_exports_and_resumes_as_todays(pretrained_workdir, tmp_path,
                                                          capsys):
  older, today = str(tmp_path / 'older'), str(tmp_path / 'today')
  _older_layout(pretrained_workdir, older)
  shutil.copytree(pretrained_workdir, today)
  saved = ocp.StandardCheckpointer().restore(os.path.join(older, 'checkpoints', '8',
                                                          'default'))
  assert 'batch_stats' in saved and 'model_state' not in saved

  want = reader.load_pretrained(pretrained_workdir)
  got = reader.load_pretrained(older)
  assert set(got.variables) == {'params', 'batch_stats'}
  for collection in got.variables:
    np.testing.assert_equal(got.variables[collection], want.variables[collection])

  config = tiny_config()
  config.num_epochs = 0.12                      # two steps more than the saved 8
  for workdir in (older, today):
    train.train_and_evaluate(config, workdir)
    assert 'Resuming from the checkpoint of step 8' in capsys.readouterr().out
  losses = [{step: record['loss'] for step, record in metrics.read_metrics(w).items()
             if step > 8 and 'loss' in record} for w in (older, today)]
  assert sorted(losses[0]) == sorted(losses[1]) == [9, 10]
  assert losses[0] == losses[1]                 # the same state: the same program
  with open(os.path.join(older, 'config.json')) as f:
    assert json.load(f)['num_epochs'] == 0.12


def test_a_model_with_other_state_refuses_an_older_checkpoint(pretrained_workdir, tmp_path):
  older = str(tmp_path / 'older')
  _older_layout(pretrained_workdir, older)
  config = tiny_config()
  test_train_step._override(config, test_train_step.TINY_VIT)   # pylint: disable=protected-access
  with pytest.raises(ValueError, match=r'The checkpoint of step 8 in .* predates model state '
                                       r'other than BatchNorm statistics, which this '
                                       r"config's model keeps \(frozen\)"):
    train.train_and_evaluate(config, older)

"""Vision Transformers through the trainer: MoCo v3's ViT recipe killed and resumed,
its timm export loaded by timm itself, and SimCLR, BYOL and MoCo v2 on a ViT.

One tiny ViT (patch 4 on 16 px, 2 blocks of width 16) serves every test.
"""

import importlib.util
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors

from contrastive import export
from contrastive import metrics
from contrastive import reader
from contrastive import train
from contrastive.data import augment
from contrastive.data import in_memory as in_memory_data
from contrastive.models import vit
from tests import faults
from tests import test_train_step
from tests import tolerances

TINY_VIT = test_train_step.TINY_VIT


def _vit_config(config, method='moco_v3'):
  """MoCo v3's ViT recipe (configs/moco_v3_vit_imagenet.py) shrunk to the tiny ViT."""
  from configs import moco_v3_vit_imagenet  # pylint: disable=g-import-not-at-top
  recipe = moco_v3_vit_imagenet.get_config()
  test_train_step._configure(config, method)    # pylint: disable=protected-access
  config.optim = recipe.optim
  config.optim.warmup_epochs = 0.02
  test_train_step._override(config, TINY_VIT)   # pylint: disable=protected-access
  config.moco_v3.temperature = 0.2
  config.head.num_layers, config.head.hidden_dim = 3, 32
  config.predictor.output_bn = True
  return config


def _losses(workdir):
  return {step: record['loss'] for step, record in metrics.read_metrics(workdir).items()
          if 'loss' in record}


@pytest.fixture(scope='module', name='runs')
def fixture_runs(tmp_path_factory):
  """An uninterrupted 5-step run, and the same run killed at step 3 and restarted."""
  from tests.conftest import tiny_config  # pylint: disable=g-import-not-at-top
  config = _vit_config(tiny_config())
  config.checkpoint_every_steps = 2
  config.num_epochs = 0.06
  root = tmp_path_factory.mktemp('vit')
  straight, resumed = str(root / 'straight'), str(root / 'resumed')
  train.train_and_evaluate(config, straight)
  monkeypatch = pytest.MonkeyPatch()
  with faults.killed_at_step(monkeypatch, in_memory_data.InMemoryTrainData, 3):
    train.train_and_evaluate(config, resumed)
  train.train_and_evaluate(config, resumed)
  return straight, resumed


def test_a_killed_vit_run_resumes_to_the_uninterrupted_losses(runs):
  straight, resumed = runs
  expected, again = _losses(straight), _losses(resumed)
  assert sorted(again) == sorted(expected) == list(range(1, 6))   # 0.06 x 81 steps
  np.testing.assert_allclose([again[s] for s in sorted(again)],
                             [expected[s] for s in sorted(expected)], rtol=1e-6)
  states = [ocp.StandardCheckpointer().restore(os.path.join(run, 'checkpoints', '5',
                                                            'default')) for run in runs]
  tolerances.assert_trees_close(states[1]['method_state'], states[0]['method_state'],
                                rtol=1e-6)
  tolerances.assert_trees_close(states[1]['opt_state'], states[0]['opt_state'], rtol=1e-6)
  # The frozen patch projection is model state: checkpointed, never trained.
  frozen = states[0]['model_state']['frozen']['encoder']['patch_embed']
  np.testing.assert_array_equal(frozen['kernel'],
                                states[1]['model_state']['frozen']['encoder']['patch_embed']
                                ['kernel'])
  assert 'patch_embed' not in states[0]['params']['encoder']


_TIMM_SCRIPT = """
import json, sys
import numpy as np
import safetensors
import timm
import torch
from safetensors.numpy import load_file

path, images = sys.argv[1], np.load(sys.argv[2])
with safetensors.safe_open(path, 'np') as f:
  kwargs = json.loads(f.metadata()['timm_kwargs'])
net = timm.models.vision_transformer.VisionTransformer(**kwargs)
net.load_state_dict({k: torch.from_numpy(v) for k, v in load_file(path).items()}, strict=True)
net.eval()
with torch.no_grad():
  features = net(torch.from_numpy(np.transpose(images, (0, 3, 1, 2)))).numpy()
np.save(sys.argv[3], features)
"""


def test_the_timm_export_loads_strictly_into_timm_and_gives_the_same_features(runs, tmp_path):
  if importlib.util.find_spec('timm') is None:
    pytest.skip('timm is not installed (pip install -e .[test])')
  straight, _ = runs
  pretrained = reader.load_pretrained(straight)
  assert isinstance(pretrained.encoder, vit.VisionTransformer)
  assert pretrained.encoder.frozen_patch_projection
  path = str(tmp_path / 'vit.safetensors')
  export.export_timm(straight, path)
  with safetensors.safe_open(path, 'np') as f:
    assert f.metadata()['timm_model'] == 'null'      # no timm name for a 2-block ViT
  images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), np.uint8)
  pixels = np.asarray(augment.preprocess_eval(images, pretrained.config.aug))
  np.save(tmp_path / 'pixels.npy', pixels)
  # Torch in its own interpreter (beside TensorFlow and XLA it can crash).
  result = subprocess.run([sys.executable, '-c', _TIMM_SCRIPT, path,
                           str(tmp_path / 'pixels.npy'), str(tmp_path / 'timm.npy')],
                          capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  # Two frameworks' float32 matmuls in different orders: rounding at the
  # features' scale (LayerNorm outputs of order 1).
  tolerances.assert_close(np.load(tmp_path / 'timm.npy'), reader.encode(pretrained, images))


def test_the_timm_format_refuses_a_resnet(pretrained_workdir, tmp_path):
  with pytest.raises(ValueError, match=r"--format=timm takes a ViT backbone; this run's is "
                                       r"a ResNet \(model.name='resnet10'\)"):
    export.export_timm(pretrained_workdir, str(tmp_path / 'resnet.safetensors'))
  assert not os.path.exists(tmp_path / 'resnet.safetensors')


@pytest.mark.parametrize('method', ['simclr', 'byol', 'moco'])
def test_the_other_methods_train_a_vit(config, method):
  """One step of each on 8 devices: the loss is finite and every trained
  parameter of the ViT moved; the frozen projection did not."""
  _vit_config(config, method)
  setup = test_train_step._setup(config, 8)           # pylint: disable=protected-access
  initial = jax.device_get(setup[5])
  state, scalars = test_train_step._run_steps(*setup)  # pylint: disable=protected-access
  assert np.isfinite(scalars['loss'])
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), state.params['encoder'],
                       initial.params['encoder'])
  assert all(jax.tree.leaves(moved))
  jax.tree.map(np.testing.assert_array_equal, state.model_state['frozen'],
               initial.model_state['frozen'])

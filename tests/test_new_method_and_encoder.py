"""A method and an encoder the library has never seen, end to end, from this file only.

The method is Wang and Isola's alignment and uniformity objective (ICML 2020):
``E ||f(x) - f(y)||^alpha + w * log E exp(-t ||f(x_i) - f(x_j)||^2)`` over the
unit-normalised projections of two views, the uniformity term over every pair of
the global batch. It brings its own config section (``config.align_uniform``,
defaults and checks here) and runs on a ResNet whose normalisation is LayerNorm
and whose head has no BatchNorm, so the network keeps no model state at all.
Through the real trainer on 8 devices with the kNN monitor and the online probe,
then ``contrastive.downstream`` and the flax export read the run back. Nothing
here changes a library file.
"""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from contrastive import config as config_lib
from contrastive import downstream
from contrastive import export
from contrastive import metrics
from contrastive import reader
from contrastive import train
from contrastive.methods import Batch, Context, LossOutput, Method
from contrastive.methods.contract import forward, replica_key
from contrastive.models import resnet
from tests import tolerances

NAME = 'align_uniform'


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({'alpha': 2.0, 't': 2.0, 'uniformity_weight': 1.0})


def check_config(config) -> list[str]:
  section, problems = config[NAME], []
  for field in ('alpha', 't'):
    if section[field] <= 0:
      problems.append(f'config.{NAME}.{field}={section[field]} must be > 0.')
  return problems


def loss(ctx: Context, params, model_state, method_state, batch: Batch, key) -> LossOutput:
  del method_state
  section, axis = ctx.config[NAME], ctx.axis_name
  view1, view2 = batch.views
  n = view1.shape[0]
  (features, projections), model_state = forward(
      ctx.model, {'params': params, **model_state}, jnp.concatenate([view1, view2]),
      replica_key(key, axis))
  z = projections / jnp.linalg.norm(projections, axis=-1, keepdims=True)
  alignment = jax.lax.pmean(
      jnp.mean(jnp.linalg.norm(z[:n] - z[n:], axis=-1) ** section.alpha), axis)
  uniformity = 0.0
  for view in (z[:n], z[n:]):
    everyone = jax.lax.all_gather(view, axis, tiled=True)               # [B, d]
    offset = jax.lax.axis_index(axis) * n
    distances = jnp.sum((view[:, None] - everyone[None]) ** 2, -1)     # [n, B]
    others = jnp.arange(everyone.shape[0])[None] != (offset + jnp.arange(n))[:, None]
    total = jax.lax.psum(jnp.sum(jnp.where(others, jnp.exp(-section.t * distances), 0)),
                         axis)
    pairs = everyone.shape[0] * (everyone.shape[0] - 1)
    uniformity += jnp.log(total / pairs) / 2
  value = alignment + section.uniformity_weight * uniformity
  return LossOutput(loss=value, model_state=model_state, features=features[:n],
                    metrics={'alignment': alignment, 'uniformity': uniformity})


ALIGN_UNIFORM = Method(name=NAME, loss=loss, default_config=default_config,
                       check_config=check_config)


def _config(config):
  config.method = NAME
  config_lib.add_method_section(config, ALIGN_UNIFORM)
  config.model.norm = 'layer'
  config.head.use_bn = False
  config.eval.enabled = True
  config.eval.compare_random_init = False
  config.eval.knn_every_epochs = 0.05                  # the monitor at steps 4 and 8
  config.eval.probe_epochs = 2
  return config


@pytest.fixture(scope='module', name='run')
def fixture_run(tmp_path_factory):
  from tests.conftest import tiny_config  # pylint: disable=g-import-not-at-top
  config = _config(tiny_config())
  workdir = str(tmp_path_factory.mktemp('align_uniform'))
  return config, workdir, train.train_and_evaluate(config, workdir, method=ALIGN_UNIFORM)


def test_it_trains_through_the_trainer_with_the_monitors(run):
  config, workdir, results = run
  records = metrics.read_metrics(workdir)
  losses = [records[step]['loss'] for step in range(1, 9)]
  assert len(set(losses)) > 1 and all(np.isfinite(losses))
  assert all('alignment' in records[step] and 'uniformity' in records[step]
             for step in range(1, 9))
  for step in (4, 8):
    assert 0.0 <= records[step]['monitor/knn_accuracy'] <= 1.0
    assert 0.0 <= records[step]['monitor/online_probe_accuracy'] <= 1.0
  assert set(results['trained']) == {'knn_accuracy', 'linear_probe_accuracy',
                                     'online_probe_accuracy'}
  # LayerNorm and a head without BatchNorm: nothing besides the parameters.
  saved = ocp.StandardCheckpointer().restore(
      os.path.join(workdir, 'checkpoints', '8', 'default'))
  assert saved['model_state'] == {}
  assert any('LayerNorm' in name for name in saved['params']['encoder']['stage1_block1'])
  assert config[NAME].t == 2.0


def test_its_section_is_checked_and_closed_before_any_data_is_read(config, tmp_path):
  config = _config(config)
  config.data.path = '/does/not/exist'
  config.data.source = 'folder'
  config[NAME].t = -1.0
  with pytest.raises(ValueError, match=rf'config\.{NAME}\.t=-1\.0 must be > 0'):
    train.train_and_evaluate(config, str(tmp_path / 'a'), method=ALIGN_UNIFORM)
  config[NAME].t = 2.0
  config[NAME].temperature = 0.1
  with pytest.raises(ValueError, match=rf'config\.{NAME}\.temperature is not a field of '
                                       rf"the '{NAME}' method; valid: alpha, t, "
                                       'uniformity_weight'):
    train.train_and_evaluate(config, str(tmp_path / 'b'), method=ALIGN_UNIFORM)


def test_downstream_and_the_flax_export_read_it_back(run, tmp_path):
  config, workdir, _ = run
  pretrained = reader.load_pretrained(workdir, method=ALIGN_UNIFORM)
  assert isinstance(pretrained.encoder, resnet.ResNet) and pretrained.encoder.norm == 'layer'
  assert set(pretrained.variables) == {'params'}

  path = str(tmp_path / 'encoder.msgpack')
  export.export_flax(workdir, path, method=ALIGN_UNIFORM)
  module, variables = export.load_flax_encoder(path)
  assert module.norm == 'layer'
  images = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), np.uint8)
  # One network, two compilations (batch 8 here, padded to 16 there): float32
  # rounding of features of order 1.
  tolerances.assert_close(module.apply(variables, images / np.float32(255), train=False),
                          reader.encode(pretrained, images, batch_size=16))

  linear = config_lib.downstream_config()
  linear.pretrained = workdir
  linear.global_batch_size = 16
  linear.num_epochs = 0.5
  linear.eval_batch_size = 64
  results = downstream.train_and_evaluate(linear, str(tmp_path / 'linear'),
                                          method=ALIGN_UNIFORM)
  assert results['backbone_unchanged'] is True
  assert 0.0 <= results['top1_accuracy'] <= results['top5_accuracy'] <= 1.0

"""BYOL and MoCo v3: their losses against float64 references, the networks they
share (online predictor, EMA target without it), asymmetric views, config errors
and resume."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import PartitionSpec as P

from contrastive import config as config_lib
from contrastive import downstream
from contrastive import export
from contrastive import losses
from contrastive import metrics
from contrastive import reader
from contrastive import train
from contrastive.data import in_memory as in_memory_data
from contrastive.formats import torch_resnet
from contrastive.methods import Batch, Context, RunInfo, byol, get_method
from tests import faults
from tests import tolerances


def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def reference_normalized_mse(p, z):
  """BYOL's loss of one direction: the mean of |p/|p| - z/|z||^2, in float64."""
  return float(np.mean(np.sum((_unit(p) - _unit(z)) ** 2, axis=1)))


def reference_in_batch_info_nce(q, k, temperature):
  """MoCo v3's ctr(q, k): cross-entropy of each query's own key among all keys."""
  logits = _unit(q) @ _unit(k).T / temperature
  log_z = np.log(np.sum(np.exp(logits - logits.max(1, keepdims=True)), axis=1)) + logits.max(1)
  return float(np.mean(log_z - np.diag(logits)))


def _mesh8():
  return jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))


def test_per_replica_losses_equal_float64_references_on_8_devices():
  rng = np.random.default_rng(0)
  p, z = rng.normal(size=(32, 6)) * 3, rng.normal(size=(32, 6))

  def replica(p, z):
    return (losses.normalized_mse(p, z, 'data'),
            losses.in_batch_info_nce(p, z, 0.5, 'data'))

  mse, nce = jax.jit(jax.shard_map(replica, mesh=_mesh8(), in_specs=(P('data'), P('data')),
                                   out_specs=(P(), P())))(
                                       jnp.asarray(p, jnp.float32), jnp.asarray(z, jnp.float32))
  # Scalars of order 1 from float32 inputs: float32 round-off, rtol 1e-5.
  np.testing.assert_allclose(mse, reference_normalized_mse(p, z), rtol=1e-5)
  np.testing.assert_allclose(nce, reference_in_batch_info_nce(p, z, 0.5), rtol=1e-5)
  # Aligned pairs cost less than unrelated ones, and the scale of either side is free.
  assert float(losses.normalized_mse(p, p + 0.01 * z)) < float(losses.normalized_mse(p, z))
  np.testing.assert_allclose(losses.in_batch_info_nce(10 * p, z, 0.5),
                             losses.in_batch_info_nce(p, z, 0.5), rtol=1e-5)


def _configure(config, method):
  config.method = method
  config.optim.name = 'lars'
  config.predictor.hidden_dim = 32
  config.moco_v3.temperature = 0.5
  config.aug2.blur_prob, config.aug2.solarize_prob = 0.1, 0.2


@pytest.mark.parametrize('method', ['byol', 'moco_v3'])
def test_method_loss_on_8_devices_is_the_papers_loss_of_the_networks_outputs(config, method):
  """The per-replica loss on 8 devices, from the online predictions and the
  target projections computed on the whole batch at once: BYOL's two directions
  summed (view 1's prediction against view 2's target and back), MoCo v3's
  ``2T (ctr(q1, k2) + ctr(q2, k1))``."""
  _configure(config, method)
  method_ = get_method(method)
  ctx = Context(model=method_.build_model(config), config=config,
                run=RunInfo(num_examples=100, num_devices=8, total_steps=10), axis_name='data')
  images = jax.random.uniform(jax.random.key(0), (2, 16, 16, 16, 3))
  variables = ctx.model.init(jax.random.key(1), images[0, :2], train=False)
  params, stats = variables['params'], {'batch_stats': variables['batch_stats']}
  state = method_.init_state(ctx, variables, jax.random.key(2))
  # The target copies encoder and projector, never the predictor.
  assert set(state['target']['params']) == {'encoder', 'head'} and 'predictor' in params

  def replica(params, stats, state, view1, view2):
    return method_.loss(ctx, params, stats, state, Batch((view1, view2), None), None).loss

  got = jax.jit(jax.shard_map(replica, mesh=_mesh8(),
                              in_specs=(P(), P(), P(), P('data'), P('data')), out_specs=P()))(
                                  params, stats, state, images[0], images[1])
  # One device, no mesh: BatchNorm over the whole batch, as the synchronised one.
  plain = ctx.model.clone(encoder=ctx.model.encoder.clone(bn_axis_name=None),
                          head=ctx.model.head.clone(bn_axis_name=None),
                          predictor=ctx.model.predictor.clone(bn_axis_name=None))
  both = jnp.concatenate(images)
  (_, _, predictions), _ = plain.apply(variables, both, train=True, mutable=['batch_stats'],
                                       method='predict')
  (_, projections), _ = plain.apply(state['target'], both, train=True,
                                    mutable=['batch_stats'])
  p1, p2 = np.asarray(predictions[:16]), np.asarray(predictions[16:])
  z1, z2 = np.asarray(projections[:16]), np.asarray(projections[16:])
  if method == 'byol':
    want = reference_normalized_mse(p1, z2) + reference_normalized_mse(p2, z1)
  else:
    t = config.moco_v3.temperature
    want = 2 * t * (reference_in_batch_info_nce(p1, z2, t) +
                    reference_in_batch_info_nce(p2, z1, t))
  # A loss of order 1 through a ResNet in float32, sharded vs not: rtol 1e-4.
  np.testing.assert_allclose(got, want, rtol=1e-4)


def test_views_are_asymmetric_and_config_errors_name_the_field(config):
  _configure(config, 'byol')
  first, second = byol.views(config)
  assert (first.field, second.field) == ('aug', 'aug2')
  assert second.aug.solarize_prob == 0.2 and first.aug.solarize_prob == 0.0
  config.byol.momentum = 1.5
  config.predictor.num_layers = 4
  config.aug2.solarize_prob = 2.0
  with pytest.raises(ValueError) as error:
    train.train_and_evaluate(config, '/tmp/unused-workdir-for-config-errors')
  message = str(error.value)
  for expected in ('config.byol.momentum=1.5', 'config.predictor.num_layers=4',
                   'config.aug2.solarize_prob=2.0'):
    assert expected in message
  config.method = 'moco_v3'
  config.byol.momentum, config.predictor.num_layers, config.aug2.solarize_prob = 0.9, 2, 0.2
  config.moco_v3.temperature = 0.0
  with pytest.raises(ValueError, match=r'config.moco_v3.temperature=0.0 must be > 0'):
    train.train_and_evaluate(config, '/tmp/unused-workdir-for-config-errors')


def _losses(workdir):
  return {step: record['loss'] for step, record in metrics.read_metrics(workdir).items()
          if 'loss' in record}


def test_killed_run_resumes_to_the_same_losses_and_target(config, tmp_path, monkeypatch):
  """BYOL's; MoCo v3 keeps the same state (the target, ``byol.update_target``)."""
  _configure(config, 'byol')
  config.checkpoint_every_steps = 2
  config.num_epochs = 0.06                 # 6 steps of 16 on the 1,797 digits
  train.train_and_evaluate(config, str(tmp_path / 'straight'))
  expected = _losses(tmp_path / 'straight')
  total = max(expected)
  with faults.killed_at_step(monkeypatch, in_memory_data.InMemoryTrainData, 3):
    train.train_and_evaluate(config, str(tmp_path / 'resumed'))
  train.train_and_evaluate(config, str(tmp_path / 'resumed'))
  resumed = _losses(tmp_path / 'resumed')
  assert sorted(resumed) == sorted(expected) and total >= 5
  np.testing.assert_allclose([resumed[s] for s in sorted(resumed)],
                             [expected[s] for s in sorted(expected)], rtol=1e-6)
  states = [ocp.StandardCheckpointer().restore(
      os.path.join(tmp_path, run, 'checkpoints', str(total), 'default'))
            for run in ('straight', 'resumed')]
  tolerances.assert_trees_close(states[1]['method_state'], states[0]['method_state'],
                                rtol=1e-6)
  # The target moved away from the online network it started as, and stays behind it.
  target = states[0]['method_state']['target']['params']['head']['Dense_0']['kernel']
  online = states[0]['params']['head']['Dense_0']['kernel']
  assert not np.allclose(target, online)
  # What downstream and every export read is the online encoder.
  straight = str(tmp_path / 'straight')
  export.export_flax(straight, str(tmp_path / 'byol.msgpack'))
  _, variables = export.load_flax_encoder(str(tmp_path / 'byol.msgpack'))
  jax.tree.map(np.testing.assert_array_equal, variables['params'],
               states[0]['params']['encoder'])
  pretrained = reader.load_pretrained(straight)
  state_dict = torch_resnet.torchvision_state_dict(pretrained)
  np.testing.assert_array_equal(
      state_dict['conv1.weight'],
      np.transpose(states[0]['params']['encoder']['stem_conv']['kernel'], (3, 2, 0, 1)))
  downstream_config = config_lib.downstream_config()
  downstream_config.pretrained = straight
  backbone = downstream.load_backbone(downstream_config, pretrained)
  assert backbone.num_features == pretrained.encoder.num_features

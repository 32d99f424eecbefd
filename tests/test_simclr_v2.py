"""SimCLR v2's memory: its config errors, SimCLR v1 left as it was, exact resume.

(Its train step on 8 devices against 1: tests/test_train_step.py; its loss
against a float64 reference: tests/test_losses.py.)
"""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import PartitionSpec as P

from contrastive import losses
from contrastive import metrics
from contrastive import train
from contrastive.data import in_memory as in_memory_data
from contrastive.methods import Batch, Context, LossOutput, RunInfo
from contrastive.methods import simclr
from contrastive.methods.contract import forward, model_state_of, replica_key
from tests import faults


# (fields set on the tiny test config (global batch 16: 32 keys a step), the problem)
BROKEN = [
    ({'simclr.queue_size': 48}, 'config.simclr.queue_size=48 must be 0 (no queue) or a '
     'positive multiple of the keys enqueued per step, 32 (global batch 16 x 2 views); '
     'try 32.'),
    ({'simclr.queue_size': -64}, 'config.simclr.queue_size=-64 must be 0 (no queue)'),
    ({'simclr.queue_size': 64, 'simclr.momentum': 1.5},
     'config.simclr.momentum=1.5 must lie in [0, 1].'),
    ({'simclr.queue_size': 64, 'simclr.momentum_schedule': 'linear'},
     "config.simclr.momentum_schedule='linear'; valid: constant, cosine"),
    ({'simclr.temperature': 0.0}, 'config.simclr.temperature=0.0 must be > 0.'),
]


@pytest.mark.parametrize('fields,expected', BROKEN, ids=[' '.join(f) for f, _ in BROKEN])
def test_a_broken_simclr_field_is_named_with_its_value(config, fields, expected):
  for path, value in fields.items():
    section, name = path.split('.')
    config[section][name] = value
  with pytest.raises(ValueError, match='^' + re.escape(expected)):
    train.check_config(config, simclr.METHOD)


def test_the_momentum_is_not_checked_without_a_queue(config):
  config.simclr.momentum = 1.5                 # unused by SimCLR v1
  train.check_config(config, simclr.METHOD)


def test_a_queue_longer_than_the_split_is_refused(config):
  config.simclr.queue_size = 1312              # 41 steps of keys
  run = RunInfo(num_examples=1297, num_devices=8, total_steps=10)
  problems = simclr.METHOD.check_run(config, run)
  assert len(problems) == 1 and problems[0].startswith(
      'config.simclr.queue_size=1312 is larger than the training split (1297 images)')
  assert problems[0].endswith('use at most 1280.')
  config.simclr.queue_size = 1280
  assert simclr.METHOD.check_run(config, run) == []


def test_the_recipes_pass_the_methods_checks():
  from configs import simclr_v2_cifar10, simclr_v2_imagenet  # pylint: disable=import-outside-toplevel
  imagenet = RunInfo(num_examples=1281167, num_devices=128, total_steps=250200)
  for arg in simclr_v2_imagenet.ARGS:
    config = simclr_v2_imagenet.get_config(arg)
    assert simclr.check_config(config) == []
    assert simclr.check_run(config, imagenet) == []
  config = simclr_v2_imagenet.get_config()
  assert (config.model.name, config.model.width, config.head.num_layers,
          config.simclr.queue_size, config.simclr.momentum) == ('resnet50', 1.0, 3, 65536, 0.999)
  assert simclr_v2_imagenet.get_config('r152_3x').model.width == 3.0
  with pytest.raises(ValueError, match='valid arguments: r50_1x, r50_2x'):
    simclr_v2_imagenet.get_config('r50_4x')
  cifar = simclr_v2_cifar10.get_config()
  assert simclr.check_config(cifar) == [] and cifar.model.stem == 'cifar'
  assert simclr.check_run(cifar, RunInfo(50000, 8, 97000)) == []


def _lowered_loss(loss, config, method_state):
  """The per-replica loss on 8 devices, lowered (not compiled)."""
  model = simclr.METHOD.build_model(config)
  ctx = Context(model=model, config=config, run=RunInfo(100, 8, 10), axis_name='data')
  shape = (config.global_batch_size, config.data.image_size, config.data.image_size, 3)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape),
                                                train=False))
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))

  def replica(variables, images):
    return loss(ctx, variables['params'], model_state_of(variables), method_state,
                Batch(views=(images, images), index=jnp.zeros(images.shape[0], jnp.int32)),
                jax.random.key(1)).loss

  fn = jax.jit(jax.shard_map(replica, mesh=mesh, in_specs=(P(), P('data')), out_specs=P()))
  return fn.lower(variables, jax.ShapeDtypeStruct(shape, jnp.float32)).as_text()


def test_without_a_queue_the_method_is_simclr_v1(config):
  """queue_size=0: no state, and the loss lowers to the program of SimCLR v1's
  loss (NT-Xent of the network's projections of both views, nothing else)."""
  def v1_loss(ctx, params, model_state, method_state, batch, key):
    del method_state
    view1, view2 = batch.views
    n = view1.shape[0]
    (features, projections), model_state = forward(
        ctx.model, {'params': params, **model_state}, jnp.concatenate([view1, view2]),
        replica_key(key, ctx.axis_name))
    value = losses.nt_xent(projections[:n], projections[n:], ctx.config.simclr.temperature,
                           axis_name=ctx.axis_name)
    return LossOutput(loss=value, model_state=model_state, features=features[:n])

  assert config.simclr.queue_size == 0
  ctx = Context(model=None, config=config, run=RunInfo(100, 8, 10), axis_name='data')
  assert simclr.METHOD.init_state(ctx, None, None) == {}
  assert simclr.METHOD.state_specs(config) == P()
  assert simclr.METHOD.update_state(ctx, {}, None, (), 0) == {}
  assert _lowered_loss(simclr.METHOD.loss, config, {}) == _lowered_loss(v1_loss, config, {})


def _losses(workdir):
  return {step: record['loss'] for step, record in metrics.read_metrics(workdir).items()
          if 'loss' in record}


def _final_method_state(workdir, step):
  state = ocp.StandardCheckpointer().restore(
      os.path.join(workdir, 'checkpoints', str(step), 'default'))
  return state['method_state'], state['params']


def test_resumed_run_with_the_queue_reproduces_uninterrupted_run(config, tmp_path,
                                                                 monkeypatch):
  """Killed mid-way and restarted with the same command: the uninterrupted run's
  losses (each step's negatives come from the queue restored with the
  checkpoint), and its final queue, ring pointer and EMA target."""
  config.simclr.queue_size = 96                # 3 steps of keys: the ring wraps mid-way
  config.simclr.momentum = 0.9                 # a target that visibly moves in 8 steps
  config.checkpoint_every_steps = 4            # few saves: they cost seconds each here
  config.eval.online_probe = False             # a smaller program to compile
  train.train_and_evaluate(config, str(tmp_path / 'straight'))
  expected = _losses(tmp_path / 'straight')
  total = max(expected)
  assert total >= 7

  with faults.killed_at_step(monkeypatch, in_memory_data.InMemoryTrainData, 6):
    train.train_and_evaluate(config, str(tmp_path / 'resumed'))
  assert set(_losses(tmp_path / 'resumed')) == {1, 2, 3, 4, 5, 6}
  train.train_and_evaluate(config, str(tmp_path / 'resumed'))   # the same command again
  resumed = _losses(tmp_path / 'resumed')
  assert sorted(resumed) == sorted(expected)
  np.testing.assert_allclose([resumed[s] for s in sorted(resumed)],
                             [expected[s] for s in sorted(expected)], rtol=1e-6)

  straight, params = _final_method_state(tmp_path / 'straight', total)
  again, _ = _final_method_state(tmp_path / 'resumed', total)
  assert int(again['queue_pointer']) == int(straight['queue_pointer']) == total * 32 % 96
  np.testing.assert_allclose(again['queue'], straight['queue'], atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               again['target'], straight['target'])
  # The queue holds unit keys, and the target lags the online network.
  np.testing.assert_allclose(np.linalg.norm(straight['queue'], axis=1), 1.0, rtol=1e-5)
  assert not np.allclose(straight['target']['params']['head']['Dense_0']['kernel'],
                         params['head']['Dense_0']['kernel'])

"""benchmarks/torch_reference.py times the step we time: from the same weights, its
network, loss, LARS update and BN statistics match ours over two steps; its
parameter count is ours for every architecture; its hyperparameters are
base_config's; a torch.compile that outlasts its limit falls back to eager mode."""

import json
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from torch import nn

from benchmarks import torch_reference
from contrastive import config as config_lib
from contrastive import losses
from contrastive import models
from contrastive import optim
from contrastive.models import resnet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(name, width, stem):
  config = config_lib.base_config()
  config.model.name, config.model.width, config.model.stem = name, width, stem
  config.model.bn = 'local'          # one device here: no mesh axis to reduce over
  config.model.precision = 'float32'
  return config


def _layer_paths(tree, prefix=()):
  """The paths of our layers' variable dicts in the order the layers were created
  (the order the reference lists its modules in). Only the dicts ``init`` builds
  keep that order: a jitted function returns its dicts with sorted keys."""
  if all(not isinstance(value, dict) for value in tree.values()):
    yield prefix
    return
  for key, value in tree.items():
    yield from _layer_paths(value, prefix + (key,))


def _at(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _init_in_creation_order(model, images):
  """(variables, their layers' paths in creation order): init compiled once
  (run op by op, a ResNet-50's init compiles hundreds of programs), the order
  read while it is traced."""
  order = {}

  def init(images):
    variables = model.init(jax.random.key(0), images, train=True)
    order.update({name: list(_layer_paths(tree)) for name, tree in variables.items()})
    return variables

  return jax.jit(init)(images), order


def _copy_weights(params, batch_stats, order, network):
  """Loads our initial variables into the reference network, layer for layer."""
  layers = [m for m in network.modules()
            if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d))]
  ours = [_at(params, path) for path in order['params']]
  stats = [_at(batch_stats, path) for path in order['batch_stats']]
  assert len(layers) == len(ours), (len(layers), len(ours))
  with torch.no_grad():
    for layer, variables in zip(layers, ours):
      if isinstance(layer, nn.Conv2d):     # HWIO -> OIHW
        layer.weight.copy_(torch.from_numpy(np.array(variables['kernel']).transpose(3, 2, 0, 1)))
      elif isinstance(layer, nn.Linear):   # (in, out) -> (out, in)
        layer.weight.copy_(torch.from_numpy(np.array(variables['kernel']).T))
      else:
        assert set(variables) == ({'scale', 'bias'} if layer.bias is not None else {'scale'})
        layer.weight.copy_(torch.from_numpy(np.array(variables['scale'])))
        if layer.bias is not None:
          layer.bias.copy_(torch.from_numpy(np.array(variables['bias'])))
        statistics = stats.pop(0)
        layer.running_mean.copy_(torch.from_numpy(np.array(statistics['mean'])))
        layer.running_var.copy_(torch.from_numpy(np.array(statistics['var'])))
  assert not stats
  return layers


def _as_ours(layer):
  """The reference layer's trainable parameters under our names and layouts."""
  if isinstance(layer, nn.Conv2d):
    return {'kernel': layer.weight.detach().numpy().transpose(2, 3, 1, 0)}
  if isinstance(layer, nn.Linear):
    return {'kernel': layer.weight.detach().numpy().T}
  out = {'scale': layer.weight.detach().numpy()}
  if layer.bias is not None:
    out['bias'] = layer.bias.detach().numpy()
  return out


@pytest.mark.parametrize('name,width,stem,image_size', [
    ('resnet18', 0.125, 'cifar', 16),        # basic blocks, 3x3 stem
    ('resnet50', 0.0625, 'imagenet', 32),    # bottlenecks, 7x7/2 stem and max-pool
])
def test_two_steps_match_ours_from_the_same_weights(name, width, stem, image_size):
  config = _config(name, width, stem)
  batch = 8
  model = models.build_model(config.model, config.head)
  rng = np.random.default_rng(0)
  views = [rng.normal(size=(batch, image_size, image_size, 3)).astype(np.float32)
           for _ in range(2)]
  variables, order = _init_in_creation_order(model, jnp.concatenate(views))
  params, batch_stats = variables['params'], variables['batch_stats']

  args = types.SimpleNamespace(model=name, width=width, stem=stem, batch=batch,
                               channels_last=False, optimizer='lars', precision='fp32',
                               temperature=config.simclr.temperature)
  network, step = torch_reference.make_step(args, torch.device('cpu'), compiled=False)
  layers = _copy_weights(params, batch_stats, order, network)

  lr = torch_reference.BASE_LR * batch / 256
  optimizer = optim.make_optimizer(config.optim, optax.constant_schedule(lr))
  opt_state = optimizer.init(params)

  def loss_fn(params, batch_stats):
    (_, z), updates = model.apply({'params': params, 'batch_stats': batch_stats},
                                  jnp.concatenate(views), train=True,
                                  mutable=['batch_stats'])
    return losses.nt_xent(z[:batch], z[batch:], config.simclr.temperature), updates

  @jax.jit
  def our_step(params, batch_stats, opt_state):
    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats)
    deltas, opt_state = optimizer.update(grads, opt_state, params)
    return loss, optax.apply_updates(params, deltas), updates['batch_stats'], opt_state

  torch_views = [torch.from_numpy(v.transpose(0, 3, 1, 2).copy()) for v in views]
  before = params
  for _ in range(2):     # the second step adds the momentum of the first
    loss, params, batch_stats, opt_state = our_step(params, batch_stats, opt_state)
    reference_loss = step(*torch_views).item()
    # Torch and XLA sum convolutions in different orders: float32 round-off.
    np.testing.assert_allclose(reference_loss, float(loss), rtol=1e-5)

  # Each layer's change over the two steps (LARS moves a kernel by ~1e-3 of its
  # norm per step, far below the weights' own round-off scale), compared at 1e-3
  # of that change's norm: float32 gradients of two frameworks agree to ~1e-5
  # relative, while a wrong trust ratio, learning rate or momentum is off by far more.
  for layer, path in zip(layers, order['params']):
    start, end = _at(before, path), _at(params, path)
    for key, value in _as_ours(layer).items():
      want = np.asarray(end[key]) - np.asarray(start[key])
      got = value - np.asarray(start[key])
      assert np.linalg.norm(got - want) <= 1e-3 * np.linalg.norm(want) + 1e-9, (layer, key)

  # BN running means (momentum 0.9 in ours is 0.1 in torch). Torch keeps the
  # unbiased variance, Flax the biased one: only the means are comparable as-is.
  bn_layers = [l for l in layers if isinstance(l, (nn.BatchNorm1d, nn.BatchNorm2d))]
  for layer, path in zip(bn_layers, order['batch_stats']):
    statistics = _at(batch_stats, path)
    want = np.asarray(statistics['mean'])
    spread = max(np.abs(want).max(), np.sqrt(np.asarray(statistics['var']).max()))
    np.testing.assert_allclose(layer.running_mean.numpy(), want, rtol=1e-4,
                               atol=1e-5 * spread)


@pytest.mark.parametrize('name,width,stem', [
    ('resnet18', 1.0, 'cifar'), ('resnet34', 0.5, 'imagenet'),
    ('resnet50', 1.0, 'imagenet'), ('resnet101', 0.25, 'cifar'),
    ('resnet152', 0.125, 'imagenet'), ('resnet10', 0.0625, 'cifar'),
])
def test_parameter_count_is_ours(name, width, stem):
  config = _config(name, width, stem)
  model = models.build_model(config.model, config.head)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                             jnp.zeros((2, 32, 32, 3)), train=True))
  ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes['params']))
  assert torch_reference.num_parameters(torch_reference.Network(name, width, stem)) == ours
  assert torch_reference.expected_parameters(name, width, stem) == ours


def test_architectures_and_hyperparameters_are_ours():
  config = config_lib.base_config()
  assert {name: (stages, block.expansion)
          for name, (stages, block) in torch_reference.ARCHITECTURES.items()} == {
              name: (tuple(stages), block.expansion)
              for name, (stages, block) in resnet.ARCHITECTURES.items()}
  assert torch_reference.BASE_LR == config.optim.base_lr
  assert config.optim.lr_scaling == 'linear'
  assert torch_reference.MOMENTUM == config.optim.momentum
  assert torch_reference.WEIGHT_DECAY == config.optim.weight_decay
  assert torch_reference.TRUST_COEFFICIENT == config.optim.trust_coefficient
  assert torch_reference.BN_MOMENTUM == pytest.approx(1 - config.model.bn_momentum)
  assert torch_reference.HEAD_LAYERS == config.head.num_layers
  assert torch_reference.HEAD_OUT_DIM == config.head.out_dim


def test_a_compile_over_its_time_limit_falls_back_to_eager(tmp_path):
  report_path = tmp_path / 'report.json'
  # A cold inductor cache: compiling ResNet-18 takes tens of seconds on a CPU.
  env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / 'inductor'))
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, 'benchmarks', 'torch_reference.py'),
       '--model=resnet18', '--width=0.25', '--stem=cifar', '--image_size=32', '--batch=8',
       '--device=cpu', '--compile', '--compile_seconds=1', '--warmup=1', '--steps=2',
       f'--json={report_path}'],
      env=env, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(report_path.read_text())
  assert not report['compiled']
  assert report['compile_error'] == (
      'TimeoutError: torch.compile warmup took over --compile_seconds=1')
  assert report['config']['warmup'] == 3
  assert report['images_per_second'] > 0
  assert 'torch.compile failed, timing eager mode' in result.stderr

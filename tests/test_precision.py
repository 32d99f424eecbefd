"""Mixed precision and rematerialisation change how the step computes, not what.

bfloat16 runs the convolutions and dense layers in bfloat16 and keeps every
parameter, optimizer and BatchNorm tensor, and the loss, in float32; remat
recomputes a stage's activations in the backward pass and changes no result; the
ResNet's BatchNorm is Flax's, keeping less for its backward pass.
"""

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from contrastive import config as config_lib
from contrastive import config_checks
from contrastive import models
from contrastive import parallel
from contrastive.models import resnet
from tests import test_train_step
from tests import tolerances


def _network(precision, remat_stages=()):
  config = config_lib.base_config()
  config.model.update(name='resnet10', width=0.125, stem='cifar', bn='local',
                      precision=precision, remat_stages=remat_stages)
  config.head.out_dim = 16
  model = models.build_model(config.model, config.head)
  variables = jax.jit(lambda key: model.init(key, jnp.zeros((2, 16, 16, 3)), train=False))(
      jax.random.key(0))
  images = jax.random.normal(jax.random.key(1), (8, 16, 16, 3))
  return model, variables, images


def _loss_fn(model, batch_stats, images):
  """A fixed random linear function of features and projections. (Not a sum of
  squares: the head ends in BatchNorm, whose outputs' sum of squares is constant,
  so its gradient would be float32 round-off, ~1e-3 of its own scale.)"""
  def loss(params):
    (features, projections), _ = model.apply(
        {'params': params, 'batch_stats': batch_stats}, images, train=True,
        mutable=['batch_stats'])
    return sum(jnp.sum(x * jax.random.normal(jax.random.key(i), x.shape))
               for i, x in enumerate((features, projections)))
  return loss


def _primitive_dtypes(jaxpr, name):
  """Input dtypes of every ``name`` equation of a jaxpr, sub-jaxprs included."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == name:
      found.append(tuple(str(v.aval.dtype) for v in eqn.invars))
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      found += _primitive_dtypes(sub, name)
  return found


def test_bfloat16_computes_in_bfloat16_and_keeps_float32_everywhere_else():
  model, variables, images = _network('bfloat16')
  for leaf in jax.tree.leaves(variables):
    assert leaf.dtype == jnp.float32
  forward = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))
  (features, projections), updates = forward(variables, images)
  # What the losses see, and the BN statistics, stay float32.
  assert features.dtype == projections.dtype == jnp.float32
  assert {leaf.dtype for leaf in jax.tree.leaves(updates)} == {jnp.dtype('float32')}
  jaxpr = jax.make_jaxpr(_loss_fn(model, variables['batch_stats'], images))(
      variables['params']).jaxpr
  convolutions = _primitive_dtypes(jaxpr, 'conv_general_dilated')
  matmuls = _primitive_dtypes(jaxpr, 'dot_general')
  assert convolutions and all(d == ('bfloat16', 'bfloat16') for d in convolutions)
  assert matmuls and all(d == ('bfloat16', 'bfloat16') for d in matmuls)
  grads = jax.eval_shape(jax.grad(_loss_fn(model, variables['batch_stats'], images)),
                         variables['params'])
  assert {leaf.dtype for leaf in jax.tree.leaves(grads)} == {jnp.dtype('float32')}
  # 'auto' is float32 on this CPU.
  assert models.compute_dtype(config_lib.base_config().model) == jnp.float32


def test_bfloat16_step_stays_close_to_the_float32_step(config):
  """Loss and gradient of one SimCLR step, bfloat16 against float32.

  bfloat16 keeps 8 bits of mantissa: each rounding moves a value by up to 2^-9
  (0.2%), and the roughly 20 roundings between the images and the loss
  accumulate to about 1% of the loss and a few percent of any one gradient. The
  gradient is therefore compared as a direction (cosine over all parameters) and
  a norm: a bfloat16 loss or softmax (T = 0.1), or an unscaled gradient, misses
  both by far more.
  """
  test_train_step._configure(config, 'simclr')
  results = {}
  for precision in ('float32', 'bfloat16'):
    config.model.precision = precision
    method, ctx, tx, _, mesh, state, batch = test_train_step._setup(config, 1)
    results[precision] = test_train_step._gradients(method, ctx, tx, mesh, state, batch)
  (loss32, grads32, _), (loss16, grads16, _) = results['float32'], results['bfloat16']
  assert loss16 != loss32      # bfloat16 really ran
  np.testing.assert_allclose(loss16, loss32, rtol=2e-2)
  flat32 = np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads32)])
  flat16 = np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads16)])
  cosine = flat16 @ flat32 / (np.linalg.norm(flat16) * np.linalg.norm(flat32))
  assert cosine > 0.99, cosine
  np.testing.assert_allclose(np.linalg.norm(flat16), np.linalg.norm(flat32), rtol=5e-2)


def test_remat_changes_no_result_and_keeps_fewer_activations():
  """Same loss and gradients with every stage rematerialised; the activations
  saved for the backward pass (the residuals of ``jax.vjp``, which no compiler
  scheduling changes) shrink to the blocks' inputs."""
  results = {}
  for stages in ((), (1, 2, 3, 4)):
    model, variables, images = _network('float32', stages)
    loss_fn = _loss_fn(model, variables['batch_stats'], images)
    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(variables['params'])
    residuals = jax.eval_shape(lambda p: jax.vjp(loss_fn, p)[1], variables['params'])
    saved = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(residuals))
    results[stages] = loss, grads, saved
  (loss, grads, saved), (loss_remat, grads_remat, saved_remat) = results.values()
  # A sum of signed terms, rounded relative to the terms (~1e-6 of it here, where
  # BatchNorm's recomputation fuses differently); a wrong recomputation is off by %.
  np.testing.assert_allclose(loss_remat, loss, rtol=1e-5)
  tolerances.assert_trees_close(grads_remat, grads)
  assert saved_remat < 0.6 * saved, (saved_remat, saved)


@pytest.mark.parametrize('field,value,message', [
    ('precision', 'fp16', "config.model.precision='fp16'; valid: auto, float32, bfloat16"),
    ('remat_stages', (0, 2), 'config.model.remat_stages=(0, 2); must be distinct ResNet'),
])
def test_bad_precision_and_remat_fields_are_named(field, value, message):
  config = config_lib.base_config()
  config.model[field] = value
  assert any(message in problem for problem in config_checks.pretraining_problems(config))


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
@pytest.mark.parametrize('axis_name', [None, parallel.AXIS])
def test_resnet_batch_norm_is_flax_batch_norm_keeping_only_its_input(dtype, axis_name):
  """Per replica on 8 devices, local or cross-replica: the same variables, outputs,
  gradients and running statistics as flax.linen.BatchNorm, in training and in
  evaluation; its backward pass keeps the input and per-channel moments only,
  where Flax's keeps two float32 copies of the input's size."""
  mesh = parallel.make_mesh()
  settings = dict(momentum=0.9, epsilon=1e-5, dtype=jnp.dtype(dtype), axis_name=axis_name)
  ours = resnet.BatchNorm(use_running_average=False, **settings)
  flax_bn = nn.BatchNorm(use_running_average=False, **settings)
  x = (3 * jax.random.normal(jax.random.key(0), (32, 5, 5, 12)) + 1).astype(dtype)
  variables = flax_bn.init(jax.random.key(1), x[:4])
  assert (jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x[:4]))
          == jax.tree.map(jnp.shape, variables))
  variables = {'batch_stats': variables['batch_stats'],
               'params': {'scale': jax.random.normal(jax.random.key(2), (12,)),
                          'bias': jax.random.normal(jax.random.key(3), (12,))}}
  weights = jax.random.normal(jax.random.key(4), x.shape)

  def results(module):
    def replica(variables, x, weights):
      def loss(params, x):
        y, updates = module.apply({**variables, 'params': params}, x, mutable=['batch_stats'])
        return jnp.sum(y.astype(jnp.float32) * weights), (y, updates['batch_stats'])
      (_, (y, stats)), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(
          variables['params'], x)
      evaluated = module.clone(use_running_average=True).apply(variables, x)
      residuals = jax.vjp(lambda x: module.apply(variables, x, mutable=['batch_stats'])[0],
                          x)[1]
      kept = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(residuals)
                 if leaf.size >= x.size)
      # pmean: running statistics of local BN are replica-dependent; compare their mean.
      return (y, evaluated, grads[1], jax.lax.pmean((grads[0], stats), parallel.AXIS),
              jnp.array(kept)[None])
    return parallel.per_replica(replica, mesh, (P(), P(parallel.AXIS), P(parallel.AXIS)),
                                (P(parallel.AXIS),) * 3 + (P(), P(parallel.AXIS))
                                )(variables, x, weights)

  *got, kept = results(ours)
  *want, flax_kept = results(flax_bn)
  # bfloat16 outputs round the same float32 values; a differently fused float32
  # sum moves one by a unit of bfloat16's last place.
  scale = tolerances.BFLOAT16_SCALE if dtype == 'bfloat16' else tolerances.SCALE
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    tolerances.assert_close(np.asarray(g, np.float32), np.asarray(w, np.float32), scale=scale)
  local_bytes = x.size // 8 * jnp.dtype(dtype).itemsize
  assert set(np.asarray(kept)) == {local_bytes}
  assert set(np.asarray(flax_kept)) == {2 * 4 * x.size // 8}    # two float32 copies

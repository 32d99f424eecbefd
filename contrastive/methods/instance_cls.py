"""Parametric instance classification with a device-sharded N-way classifier.

Every training image is its own class (Liu et al., "Train a One-Million-Way
Instance Classifier for Unsupervised Visual Representation Learning", AAAI 2021;
PIC, Cao et al. 2020, is its close relative): one branch, encoder + MLP head + a
classifier with one row per image, trained with a softmax over all N images. Three
parts make it work at ImageNet scale:

- Hybrid parallelism. The encoder and head are data-parallel. The classifier's
  rows are split across the devices (:mod:`contrastive.methods.rows`), with their
  optimizer state: each device scores the gathered global batch against its own
  rows only, ``[B, N / n]``, and the softmax over all N classes is combined by the
  sharded log-sum-exp. Rows and features are L2-normalised (a cosine classifier)
  and divided by a temperature.
- Contrastive prior. Before the first step, each row is set to the normalised
  head output of its own image from the randomly initialised network, BatchNorm
  in training mode (``instance_cls.contrastive_prior``).
- Smoothed labels of the hardest classes. At the start of every epoch each row's
  ``smoothing_neighbours`` most similar other rows are found, by a search that is
  itself sharded; image i's target is ``1 - smoothing`` on i and
  ``smoothing / K`` on each of those K rows (``smoothing`` 0: plain instance
  classification).

The classifier lives in the parameters (``params['classifier']``, padded to a
multiple of the device count), so it is checkpointed and resumed with the rest;
export and downstream evaluation read only the encoder.
"""

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import PartitionSpec as P

from contrastive import losses
from contrastive import parallel
from contrastive.methods import rows
from contrastive.methods.contract import (Batch, Context, LossOutput, Method, forward,
                                          replica_key, two_views)

CLASSIFIER = 'classifier'


def default_config() -> ml_collections.ConfigDict:
  section = ml_collections.ConfigDict()
  section.temperature = 0.2         # cosine logits / T (normalize=True)
  section.normalize = True          # L2-normalised rows and features
  section.contrastive_prior = True  # rows <- the random network's features
  section.smoothing = 0.0           # alpha: target 1 - alpha on i, alpha / K on its K
  section.smoothing_neighbours = 5  # K most similar rows, found once an epoch
  section.neighbour_chunk = 1024    # rows scored at a time by that search
  return section


def check_config(config) -> list[str]:
  section, problems = config.instance_cls, []
  if section.temperature <= 0:
    problems.append(f'config.instance_cls.temperature={section.temperature} must be > 0.')
  if not 0.0 <= section.smoothing < 1.0:
    problems.append(f'config.instance_cls.smoothing={section.smoothing} must lie in '
                    '[0, 1) (0: no smoothing).')
  if section.smoothing > 0 and section.smoothing_neighbours < 1:
    problems.append(f'config.instance_cls.smoothing_neighbours='
                    f'{section.smoothing_neighbours} must be >= 1 when smoothing > 0.')
  if section.neighbour_chunk < 1:
    problems.append(f'config.instance_cls.neighbour_chunk={section.neighbour_chunk} '
                    'must be >= 1.')
  if config.optim.name == 'lars':
    problems.append("config.optim.name='lars' cannot train the sharded classifier: "
                    "LARS's per-layer trust ratio would be each device's own rows' "
                    "norm; use 'sgd' (the paper's) or 'adamw'.")
  return problems


def _smoothing(config) -> bool:
  return config.instance_cls.smoothing > 0


def _network(params):
  """The encoder and head parameters: what ``ctx.model`` applies."""
  return {name: value for name, value in params.items() if name != CLASSIFIER}


def _class_rows(params, config):
  weights = params[CLASSIFIER]
  return losses.l2_normalize(weights) if config.instance_cls.normalize else weights


def init_params(ctx: Context, variables, key):
  """The network's parameters and N random classifier rows (zero padding after)."""
  run, dim = ctx.run, ctx.config.head.out_dim
  padded = rows.padded_rows(run.num_examples, run.num_devices)
  # Drawn for the N real rows, then padded: the same rows on any device count.
  weights = jax.random.normal(key, (run.num_examples, dim), jnp.float32) * dim ** -0.5
  weights = jnp.pad(weights, ((0, padded - run.num_examples), (0, 0)))
  return {**variables['params'], CLASSIFIER: weights}


def param_specs(config):
  del config
  return {CLASSIFIER: P(parallel.AXIS)}


def init_state(ctx: Context, variables, key):
  del variables, key
  if not _smoothing(ctx.config):
    return {}
  neighbours = ctx.config.instance_cls.smoothing_neighbours
  if neighbours >= ctx.run.num_examples:
    raise ValueError(
        f'config.instance_cls.smoothing_neighbours={neighbours} must be below the '
        f'{ctx.run.num_examples} images of the training split.')
  padded = rows.padded_rows(ctx.run.num_examples, ctx.run.num_devices)
  return {'neighbours': jnp.zeros((padded, neighbours), jnp.int32)}


def state_specs(config):
  return {'neighbours': P(parallel.AXIS)} if _smoothing(config) else {}


def start_epoch(ctx: Context, method_state, params):
  """Each row's nearest other rows, the targets' smoothing for the coming epoch."""
  section = ctx.config.instance_cls
  found, _ = rows.nearest_rows(losses.l2_normalize(params[CLASSIFIER]),
                               section.smoothing_neighbours, ctx.run.num_examples,
                               ctx.axis_name, section.neighbour_chunk)
  return {**method_state, 'neighbours': found}


def targets(ctx: Context, method_state, index, axis_name):
  """Each image's classes and their target weights: ``[B, 1 + K]`` each."""
  if not _smoothing(ctx.config):
    return index[:, None], jnp.ones(index.shape + (1,), jnp.float32)
  alpha = ctx.config.instance_cls.smoothing
  neighbours = rows.read(method_state['neighbours'], index, axis_name)   # [B, K]
  k = neighbours.shape[1]
  weights = jnp.concatenate([jnp.full((1,), 1.0 - alpha), jnp.full((k,), alpha / k)])
  return (jnp.concatenate([index[:, None], neighbours], axis=1),
          jnp.broadcast_to(weights, (index.shape[0], k + 1)))


def loss(ctx: Context, params, model_state, method_state, batch: Batch, key) -> LossOutput:
  config, axis_name = ctx.config, ctx.axis_name
  (features, projections), model_state = forward(
      ctx.model, {'params': _network(params), **model_state}, batch.views[0],
      replica_key(key, axis_name))
  if config.instance_cls.normalize:
    projections = losses.l2_normalize(projections)
  queries = rows.gather(projections, axis_name)                        # [B, d]
  index = rows.gather(batch.index, axis_name)                          # [B]
  weights = _class_rows(params, config)                               # [R, d] (own rows)
  logits = queries @ weights.T / config.instance_cls.temperature      # [B, R]
  columns = rows.shard_columns(weights, axis_name)
  classes, target_weights = targets(ctx, method_state, index, axis_name)
  per_image = losses.sharded_soft_cross_entropy(
      logits, columns[0], classes, target_weights, axis_name,
      column_mask=columns < ctx.run.num_examples)
  # Every device holds all B rows; each averages its own images' and the mean of
  # those is the global loss, so that gradients stay global (as in info_nce).
  n = batch.index.shape[0]
  device, _ = rows.shard_position(weights, axis_name)
  value = jnp.mean(jax.lax.dynamic_slice_in_dim(per_image, device * n, n))
  if axis_name is not None:
    value = jax.lax.pmean(value, axis_name)
  return LossOutput(loss=value, model_state=model_state, features=features)


def write_prior(ctx: Context, params, model_state, method_state, images, index, mask):
  """The contrastive prior: each image's row <- its normalised head output."""
  axis_name = ctx.axis_name
  (_, projections), _ = forward(ctx.model, {'params': _network(params), **model_state},
                                images)
  features = rows.gather(losses.l2_normalize(projections), axis_name)
  weights = rows.write(params[CLASSIFIER], rows.gather(index, axis_name), features,
                       axis_name, keep=rows.gather(mask, axis_name))
  return {**params, CLASSIFIER: weights}, method_state


def prior(config):
  return write_prior if config.instance_cls.contrastive_prior else None


def views(config):
  """One view: the classifier's input."""
  return two_views(config)[:1]


def epoch_work(config):
  return start_epoch if _smoothing(config) else None


METHOD = Method(name='instance_cls', loss=loss, default_config=default_config, views=views,
                check_config=check_config,
                init_params=init_params, param_specs=param_specs, init_state=init_state,
                state_specs=state_specs, start_epoch=epoch_work, init_from_data=prior)

"""SimCLR (Chen et al. 2020): the other views of the global batch are the negatives.

SimCLR v2 (Chen et al. 2020b) adds MoCo's memory when ``config.simclr.queue_size``
is K > 0: an EMA copy of the network (:mod:`contrastive.methods.ema`, its BatchNorm
as ``config.model.bn``) embeds both views of every image, and the last K of those
embeddings are K more negatives for every anchor. The queue is MoCo's (one global
FIFO split across devices, :mod:`contrastive.methods.queue`), filled view 1 then
view 2 so that its order does not depend on the device count. With K = 0 the
method keeps no state and runs SimCLR v1's program.
"""

import jax.numpy as jnp
import ml_collections
from jax.sharding import PartitionSpec as P

from contrastive import losses
from contrastive.methods import ema
from contrastive.methods import moco
from contrastive.methods import queue as queue_lib
from contrastive.methods.contract import (Batch, Context, LossOutput, Method, forward,
                                          replica_key)


def default_config() -> ml_collections.ConfigDict:
  section = ml_collections.ConfigDict()
  section.temperature = 0.1
  # SimCLR v2's memory: an EMA copy of the network whose projections of past
  # batches are queued and added to the in-batch negatives. 0: no queue (SimCLR v1).
  section.queue_size = 0
  section.momentum = 0.999           # that copy's EMA momentum
  section.momentum_schedule = 'constant'
  return section


def keys_per_step(config) -> int:
  """Keys enqueued per step: both views of every image of the global batch."""
  return 2 * config.global_batch_size


def loss(ctx: Context, params, model_state, method_state, batch: Batch, key) -> LossOutput:
  """Both views go through the network as one batch, so BN sees both."""
  simclr = ctx.config.simclr
  view1, view2 = batch.views
  n = view1.shape[0]
  images = jnp.concatenate([view1, view2])
  (features, projections), model_state = forward(
      ctx.model, {'params': params, **model_state}, images, replica_key(key, ctx.axis_name))
  negatives = method_state['queue'] if simclr.queue_size else None
  value = losses.nt_xent(projections[:n], projections[n:], simclr.temperature,
                         axis_name=ctx.axis_name, negatives=negatives)
  out = LossOutput(loss=value, model_state=model_state, features=features[:n])
  if not simclr.queue_size:
    return out
  keys, target_state = moco.compute_keys(ctx.model, method_state['target'], images,
                                         key, ctx.config.model.bn, ctx.axis_name)
  return out._replace(for_update={'keys': (keys[:n], keys[n:]),
                                  'target_model_state': target_state})


def check_config(config) -> list[str]:
  simclr = config.simclr
  problems = []
  if simclr.temperature <= 0:
    problems.append(f'config.simclr.temperature={simclr.temperature} must be > 0.')
  problems += queue_lib.size_problems(
      'simclr.queue_size', simclr.queue_size, keys_per_step(config),
      f'{keys_per_step(config)} (global batch {config.global_batch_size} x 2 views)',
      optional=True)
  if simclr.queue_size:
    problems += ema.check(simclr, 'simclr')
  return problems


def check_run(config, run) -> list[str]:
  return queue_lib.split_problems('simclr.queue_size', config.simclr.queue_size,
                                  keys_per_step(config), run.num_examples)


def init_state(ctx: Context, variables, key):
  config = ctx.config
  if not config.simclr.queue_size:
    return {}
  return {'target': ema.init(variables),
          'queue': queue_lib.random_keys(key, config.simclr.queue_size, config.head.out_dim),
          queue_lib.POINTER: queue_lib.init_pointer()}


def state_specs(config):
  return {'target': P(), **queue_lib.specs()} if config.simclr.queue_size else P()


def update_state(ctx: Context, method_state, params, for_update, step):
  simclr = ctx.config.simclr
  if not simclr.queue_size:
    return method_state
  momentum = ema.momentum_at(step, simclr.momentum, simclr.momentum_schedule,
                             ctx.run.total_steps)
  queue, pointer = method_state['queue'], method_state[queue_lib.POINTER]
  for keys in for_update['keys']:         # all of view 1, then all of view 2
    queue, pointer = queue_lib.enqueue(queue, pointer, keys, ctx.axis_name, simclr.queue_size)
  return {
      'target': ema.update(method_state['target'], params,
                           for_update['target_model_state'], momentum),
      'queue': queue,
      queue_lib.POINTER: pointer,
  }


METHOD = Method(name='simclr', loss=loss, default_config=default_config,
                check_config=check_config, check_run=check_run, init_state=init_state,
                state_specs=state_specs, update_state=update_state)

"""SimCLR (Chen et al. 2020): the other views of the global batch are the negatives.

SimCLR v2 (Chen et al. 2020b) adds MoCo's memory when ``config.simclr.queue_size``
is K > 0: an EMA copy of the network (:mod:`contrastive.methods.ema`, its BatchNorm
as ``config.model.bn``) embeds both views of every image, and the last K of those
embeddings are K more negatives for every anchor. The queue is MoCo's (one global
FIFO split across devices, :func:`contrastive.methods.moco.enqueue`), filled view 1
then view 2 so that its order does not depend on the device count. With K = 0 the
method keeps no state and runs SimCLR v1's program.
"""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from contrastive import losses
from contrastive.methods import ema
from contrastive.methods import moco
from contrastive.methods.contract import Batch, Context, LossOutput, Method


def keys_per_step(config) -> int:
  """Keys enqueued per step: both views of every image of the global batch."""
  return 2 * config.global_batch_size


def loss(ctx: Context, params, batch_stats, method_state, batch: Batch, key) -> LossOutput:
  """Both views go through the network as one batch, so BN sees both."""
  simclr = ctx.config.simclr
  view1, view2 = batch.views
  n = view1.shape[0]
  images = jnp.concatenate([view1, view2])
  (features, projections), updates = ctx.model.apply(
      {'params': params, 'batch_stats': batch_stats}, images, train=True,
      mutable=['batch_stats'])
  negatives = method_state['queue'] if simclr.queue_size else None
  value = losses.nt_xent(projections[:n], projections[n:], simclr.temperature,
                         axis_name=ctx.axis_name, negatives=negatives)
  out = LossOutput(loss=value, batch_stats=updates['batch_stats'], features=features[:n])
  if not simclr.queue_size:
    return out
  keys, target_batch_stats = moco.compute_keys(ctx.model, method_state['target'], images,
                                               key, ctx.config.model.bn, ctx.axis_name)
  return out._replace(for_update={'keys': (keys[:n], keys[n:]),
                                  'target_batch_stats': target_batch_stats})


def check_config(config) -> list[str]:
  simclr = config.simclr
  problems = []
  if simclr.temperature <= 0:
    problems.append(f'config.simclr.temperature={simclr.temperature} must be > 0.')
  per_step = keys_per_step(config)
  if per_step > 0 and (simclr.queue_size < 0 or simclr.queue_size % per_step):
    problems.append(
        f'config.simclr.queue_size={simclr.queue_size} must be 0 (no queue) or a positive '
        f'multiple of the keys enqueued per step, {per_step} (global batch '
        f'{config.global_batch_size} x 2 views); try '
        f'{max(1, simclr.queue_size // per_step) * per_step}.')
  if simclr.queue_size:
    problems += ema.check(simclr, 'simclr')
  return problems


def check_run(config, run) -> list[str]:
  if config.simclr.queue_size > run.num_examples:
    per_step = keys_per_step(config)
    fits = run.num_examples // per_step * per_step
    return [f'config.simclr.queue_size={config.simclr.queue_size} is larger than the '
            f'training split ({run.num_examples} images): the queue would hold keys of '
            f'the very images in the batch, positives as negatives; use at most {fits}.']
  return []


def init_state(ctx: Context, variables, key):
  config = ctx.config
  if not config.simclr.queue_size:
    return {}
  queue = losses.l2_normalize(
      jax.random.normal(key, (config.simclr.queue_size, config.head.out_dim), jnp.float32))
  return {'target': ema.init(variables), 'queue': queue,
          'queue_pointer': jnp.zeros((), jnp.int32)}


def state_specs(config):
  return moco.state_specs(config) if config.simclr.queue_size else P()


def update_state(ctx: Context, method_state, params, for_update, step):
  simclr = ctx.config.simclr
  if not simclr.queue_size:
    return method_state
  momentum = ema.momentum_at(step, simclr.momentum, simclr.momentum_schedule,
                             ctx.run.total_steps)
  queue, pointer = method_state['queue'], method_state['queue_pointer']
  for keys in for_update['keys']:         # all of view 1, then all of view 2
    queue, pointer = moco.enqueue(queue, pointer, keys, ctx.axis_name, simclr.queue_size)
  return {
      'target': ema.update(method_state['target'], params,
                           for_update['target_batch_stats'], momentum),
      'queue': queue,
      'queue_pointer': pointer,
  }


METHOD = Method(name='simclr', loss=loss, check_config=check_config, check_run=check_run,
                init_state=init_state, state_specs=state_specs, update_state=update_state)

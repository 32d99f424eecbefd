"""MoCo v1 / v2 (He et al. 2019; Chen et al. 2020): negatives from a queue of keys.

Keys come from an EMA target network (:mod:`contrastive.methods.ema`), the key
encoder, which never receives gradients. The queue of the last K keys is one
global FIFO ring split across devices by rows (:mod:`contrastive.methods.queue`),
the same on any number of devices.

Key-encoder BatchNorm (``config.moco.key_bn``): 'global' (synchronised across
replicas), 'local' (per device) or 'shuffle' (MoCo's shuffle BN: the key batch is
permuted across devices by one global permutation before the key encoder and
restored after, so per-device statistics cannot reveal which query goes with
which key). With ``config.moco.bn_groups`` = G, the permuted global key batch is
cut into G groups of B / G, each normalised with its own statistics: MoCo's
split BatchNorm, which gives shuffle BN on a single device, and keys that do not
depend on the device count (each device holds G / n whole groups).
"""

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import PartitionSpec as P

from contrastive import losses
from contrastive import models
from contrastive.methods import ema
from contrastive.methods import queue as queue_lib
from contrastive.methods.contract import (Batch, Context, LossOutput, Method, forward,
                                          mean_statistics, replica_key)

KEY_BN_MODES = ('shuffle', 'global', 'local')


def default_config() -> ml_collections.ConfigDict:
  section = ml_collections.ConfigDict()
  section.queue_size = 65536           # K keys, split across devices; multiple of the batch
  section.momentum = 0.999             # key encoder EMA
  section.momentum_schedule = 'constant'  # or 'cosine' (from momentum towards 1)
  section.temperature = 0.07
  section.key_bn = 'shuffle'           # key encoder BN: 'shuffle', 'global' or 'local'
  section.symmetric = False            # both views as queries (sum of both losses)
  # key_bn='shuffle': the global key batch is cut into this many groups, each
  # normalised with its own statistics (MoCo's split BN on one device); 0: one
  # group per device. A fixed number makes the keys independent of the device count.
  section.bn_groups = 0
  return section


def keys_per_step(config) -> int:
  """Keys enqueued per step: one per image, two with the symmetric loss."""
  return config.global_batch_size * (2 if config.moco.symmetric else 1)


def check_config(config) -> list[str]:
  moco = config.moco
  problems = ema.check(moco, 'moco')
  if moco.key_bn not in KEY_BN_MODES:
    problems.append(f'config.moco.key_bn={moco.key_bn!r}; valid: {", ".join(KEY_BN_MODES)}')
  if moco.temperature <= 0:
    problems.append(f'config.moco.temperature={moco.temperature} must be > 0.')
  per_step = keys_per_step(config)
  groups = moco.bn_groups
  if groups < 0:
    problems.append(f'config.moco.bn_groups={groups} must be >= 0 (0: one per device).')
  elif groups and moco.key_bn != 'shuffle':
    problems.append(f'config.moco.bn_groups={groups} splits the shuffled key batch, but '
                    f"config.moco.key_bn={moco.key_bn!r}: set key_bn='shuffle' or "
                    'bn_groups=0.')
  elif groups and per_step % groups:
    problems.append(f'config.moco.bn_groups={groups} must divide the {per_step} keys '
                    'of a step (the global batch, x 2 with the symmetric loss).')
  views = ' x 2 views (symmetric loss)' if moco.symmetric else ''
  problems += queue_lib.size_problems(
      'moco.queue_size', moco.queue_size, per_step,
      f'{per_step} (global batch {config.global_batch_size}{views})')
  return problems


def check_run(config, run) -> list[str]:
  groups = config.moco.bn_groups
  if groups and groups % run.num_devices:
    return [f'config.moco.bn_groups={groups} must be a multiple of the {run.num_devices} '
            'devices, so that each device normalises whole groups.']
  return queue_lib.split_problems('moco.queue_size', config.moco.queue_size,
                                  keys_per_step(config), run.num_examples)


def init_state(ctx: Context, variables, key):
  config = ctx.config
  return {'target': ema.init(variables),
          'queue': queue_lib.random_keys(key, config.moco.queue_size, config.head.out_dim),
          queue_lib.POINTER: queue_lib.init_pointer()}


def state_specs(config):
  del config
  return {'target': P(), **queue_lib.specs()}


def loss(ctx: Context, params, model_state, method_state, batch: Batch, key) -> LossOutput:
  moco = ctx.config.moco
  view1, view2 = batch.views
  if moco.symmetric:        # both views are queries; each one's key is the other view
    query_views = jnp.concatenate([view1, view2])
    key_views = jnp.concatenate([view2, view1])
  else:
    query_views, key_views = view1, view2
  (features, queries), model_state = forward(
      ctx.model, {'params': params, **model_state}, query_views,
      replica_key(key, ctx.axis_name))
  keys, target_state = compute_keys(ctx.model, method_state['target'], key_views, key,
                                    moco.key_bn, ctx.axis_name, moco.bn_groups)
  value = losses.info_nce(queries, keys, method_state['queue'], moco.temperature,
                          axis_name=ctx.axis_name)
  if moco.symmetric:        # the sum of both directions, as in MoCo's CIFAR recipe
    value = 2.0 * value
  return LossOutput(loss=value, model_state=model_state, features=features[:view1.shape[0]],
                    for_update={'keys': keys, 'target_model_state': target_state})


def compute_keys(model, target, views, key, key_bn: str, axis_name, bn_groups: int = 0):
  """L2-normalised key projections of ``views`` by the EMA ``target`` network, and
  its new model state (statistics averaged over replicas unless synchronised).
  ``bn_groups`` > 0: the shuffled global batch normalised in that many groups."""
  key_model = models.with_bn_axis(model, axis_name if key_bn == 'global' else None)
  shuffle = key_bn == 'shuffle' and axis_name is not None
  if shuffle:
    views, unshuffle = shuffle_across_devices(views, key, axis_name)
  if bn_groups:
    devices = 1 if axis_name is None else jax.lax.axis_size(axis_name)
    (_, keys), model_state = grouped_forward(key_model, target, views, bn_groups // devices)
  else:
    (_, keys), model_state = ema.forward(key_model, target, views)
  if shuffle:
    keys = unshuffle(keys)
  if key_bn != 'global':
    model_state = mean_statistics(model_state, axis_name)
  return losses.l2_normalize(keys), model_state


def grouped_forward(model, target, images, groups: int):
  """:func:`ema.forward` on ``groups`` consecutive slices of ``images``, each with
  its own BatchNorm statistics; the running statistics are their mean, as in
  MoCo's split BatchNorm (the rest of the model state is the same in every group)."""
  grouped = images.reshape(groups, images.shape[0] // groups, *images.shape[1:])
  outputs, model_state = jax.vmap(lambda x: ema.forward(model, target, x))(grouped)
  outputs = jax.tree.map(lambda y: y.reshape(-1, *y.shape[2:]), outputs)
  return outputs, jax.tree.map(lambda s: jnp.mean(s, axis=0), model_state)


def shuffle_across_devices(x, key, axis_name):
  """This device's part of the global batch after one global permutation.

  Returns the permuted local rows and the function that brings per-row results
  computed on them back to the original rows of this device.
  """
  local = x.shape[0]
  offset = jax.lax.axis_index(axis_name) * local
  everything = jax.lax.all_gather(x, axis_name, tiled=True)
  permutation = jax.random.permutation(key, everything.shape[0])
  mine = jax.lax.dynamic_slice_in_dim(everything[permutation], offset, local)

  def unshuffle(y):
    gathered = jax.lax.all_gather(y, axis_name, tiled=True)   # row j: item permutation[j]
    restored = gathered[jnp.argsort(permutation)]
    return jax.lax.dynamic_slice_in_dim(restored, offset, local)

  return mine, unshuffle


def update_state(ctx: Context, method_state, params, for_update, step):
  moco = ctx.config.moco
  momentum = ema.momentum_at(step, moco.momentum, moco.momentum_schedule,
                             ctx.run.total_steps)
  queue, pointer = queue_lib.enqueue(method_state['queue'], method_state[queue_lib.POINTER],
                                     for_update['keys'], ctx.axis_name, moco.queue_size)
  return {
      'target': ema.update(method_state['target'], params,
                           for_update['target_model_state'], momentum),
      'queue': queue,
      queue_lib.POINTER: pointer,
  }


METHOD = Method(name='moco', loss=loss, default_config=default_config,
                check_config=check_config, check_run=check_run, init_state=init_state,
                state_specs=state_specs, update_state=update_state)

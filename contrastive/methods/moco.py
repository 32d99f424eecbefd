"""MoCo v1 / v2 (He et al. 2019; Chen et al. 2020): negatives from a queue of keys.

Keys come from a key encoder whose parameters are an exponential moving average
of the query encoder's and which never receives gradients. The queue of the last
K keys is split across devices, K / n rows each; every step each device writes
its own new keys into its shard at a shared ring pointer. Read in the order
"step block, device, row", the shards form one global FIFO queue, so the
negatives seen at every step do not depend on the number of devices.

Key-encoder BatchNorm (``config.moco.key_bn``): 'global' (synchronised across
replicas), 'local' (per device) or 'shuffle' (MoCo's shuffle BN: the key batch is
permuted across devices by one global permutation before the key encoder and
restored after, so per-device statistics cannot reveal which query goes with
which key).
"""

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import PartitionSpec as P

from contrastive import losses
from contrastive import models
from contrastive import parallel

KEY_BN_MODES = ('shuffle', 'global', 'local')
MOMENTUM_SCHEDULES = ('constant', 'cosine')


def build_model(config: ml_collections.ConfigDict):
  return models.build_model(config.model, config.head)


def keys_per_step(config, run) -> int:
  """Keys enqueued per step: one per image, two with the symmetric loss."""
  return run.global_batch_size * (2 if config.moco.symmetric else 1)


def init_method_state(config, variables, run, key):
  moco = config.moco
  if moco.key_bn not in KEY_BN_MODES:
    raise ValueError(f'config.moco.key_bn={moco.key_bn!r}; valid: {", ".join(KEY_BN_MODES)}')
  if moco.momentum_schedule not in MOMENTUM_SCHEDULES:
    raise ValueError(f'config.moco.momentum_schedule={moco.momentum_schedule!r}; valid: '
                     f'{", ".join(MOMENTUM_SCHEDULES)}')
  if not 0.0 <= moco.momentum <= 1.0:
    raise ValueError(f'config.moco.momentum={moco.momentum} must lie in [0, 1].')
  per_step = keys_per_step(config, run)
  if moco.queue_size <= 0 or moco.queue_size % per_step:
    views = ' x 2 views (symmetric loss)' if moco.symmetric else ''
    raise ValueError(
        f'config.moco.queue_size={moco.queue_size} must be a positive multiple of the '
        f'keys enqueued per step, {per_step} (global batch {run.global_batch_size}{views}); '
        f'try {max(1, moco.queue_size // per_step) * per_step}.')
  queue = losses.l2_normalize(
      jax.random.normal(key, (moco.queue_size, config.head.out_dim), jnp.float32))
  return {
      'target_params': variables['params'],
      'target_batch_stats': variables['batch_stats'],
      'queue': fifo_to_storage(queue, run.num_devices, per_step),
      'queue_pointer': jnp.zeros((), jnp.int32),
  }


def state_specs(config):
  del config
  return {'target_params': P(), 'target_batch_stats': P(),
          'queue': P(parallel.AXIS), 'queue_pointer': P()}


def fifo_to_storage(queue, num_devices: int, per_step: int):
  """A queue in FIFO order -> the row order of its device-sharded array.

  FIFO row ``s * per_step + d * per_device + i`` (step block s, device d) is row
  ``s * per_device + i`` of device d's shard.
  """
  size, dim = queue.shape
  per_device = per_step // num_devices
  return queue.reshape(size // per_step, num_devices, per_device, dim).transpose(
      1, 0, 2, 3).reshape(size, dim)


def loss(model, params, batch_stats, method_state, inputs, key, config, run, axis_name):
  moco = config.moco
  view1, view2 = inputs['view1'], inputs['view2']
  if moco.symmetric:        # both views are queries; each one's key is the other view
    query_views = jnp.concatenate([view1, view2])
    key_views = jnp.concatenate([view2, view1])
  else:
    query_views, key_views = view1, view2
  (features, queries), updates = model.apply(
      {'params': params, 'batch_stats': batch_stats}, query_views, train=True,
      mutable=['batch_stats'])
  keys, target_batch_stats = compute_keys(model, method_state, key_views, key,
                                          moco.key_bn, axis_name)
  keys = jax.lax.stop_gradient(keys)
  value = losses.info_nce(queries, keys, method_state['queue'], moco.temperature,
                          axis_name=axis_name)
  if moco.symmetric:        # the sum of both directions, as in MoCo's CIFAR recipe
    value = 2.0 * value
  for_update = {'keys': keys, 'target_batch_stats': target_batch_stats}
  return value, {'batch_stats': updates['batch_stats'], 'for_update': for_update,
                 'metrics': {}, 'features': features[:view1.shape[0]]}


def compute_keys(model, method_state, views, key, key_bn: str, axis_name):
  """L2-normalised key projections of ``views`` and the key encoder's new BN stats."""
  key_model = models.with_bn_axis(model, axis_name if key_bn == 'global' else None)
  shuffle = key_bn == 'shuffle' and axis_name is not None
  if shuffle:
    views, unshuffle = shuffle_across_devices(views, key, axis_name)
  (_, keys), updates = key_model.apply(
      {'params': method_state['target_params'],
       'batch_stats': method_state['target_batch_stats']},
      views, train=True, mutable=['batch_stats'])
  if shuffle:
    keys = unshuffle(keys)
  batch_stats = updates['batch_stats']
  if key_bn != 'global' and axis_name is not None:
    batch_stats = jax.lax.pmean(batch_stats, axis_name)
  return losses.l2_normalize(keys), batch_stats


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


def momentum_at(step, moco, total_steps: int):
  """EMA momentum: constant, or BYOL's cosine increase from ``moco.momentum`` to 1."""
  if moco.momentum_schedule == 'constant':
    return jnp.asarray(moco.momentum, jnp.float32)
  progress = jnp.minimum(step / max(total_steps, 1), 1.0)
  return 1.0 - (1.0 - moco.momentum) * (jnp.cos(jnp.pi * progress) + 1.0) / 2.0


def ema(target, online, momentum):
  return jax.tree.map(lambda t, o: momentum * t + (1.0 - momentum) * o, target, online)


def enqueue(queue, pointer, keys):
  """Writes ``keys`` at the ring pointer, overwriting the oldest rows of the shard."""
  queue = jax.lax.dynamic_update_slice_in_dim(queue, keys.astype(queue.dtype), pointer,
                                              axis=0)
  return queue, (pointer + keys.shape[0]) % queue.shape[0]


def update_method_state(method_state, params, for_update, step, config, run, axis_name):
  del axis_name
  momentum = momentum_at(step, config.moco, run.total_steps)
  queue, pointer = enqueue(method_state['queue'], method_state['queue_pointer'],
                           for_update['keys'])
  return {
      'target_params': ema(method_state['target_params'], params, momentum),
      'target_batch_stats': for_update['target_batch_stats'],
      'queue': queue,
      'queue_pointer': pointer,
  }


encode = models.encoder_features

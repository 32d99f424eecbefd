"""Instance discrimination with a memory bank (Wu et al. 2018).

Every training image is its own class. The bank stores one L2-normalised
embedding per image, refreshed with momentum each time the image is seen; the
query is the network's embedding of one view, its positive is the image's own
bank row, and the negatives are bank rows sampled uniformly (or the whole bank).

The bank is split across devices by rows, ``ceil(N / n)`` each (the last rows of
the last shard are padding, never used). Negatives are drawn as global row
indices, identical on every device; each device scores only the drawn rows it
owns and the softmax is combined across devices, so the result does not depend
on the number of devices.
"""

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import PartitionSpec as P

from contrastive import losses
from contrastive import models
from contrastive import parallel


def build_model(config: ml_collections.ConfigDict):
  return models.build_model(config.model, config.head)


def bank_rows(run) -> int:
  """Rows of the sharded bank: the split size rounded up to the device count."""
  return -(-run.num_examples // run.num_devices) * run.num_devices


def init_method_state(config, variables, run, key):
  del variables
  bank = config.membank
  if bank.num_negatives < 0:
    raise ValueError(f'config.membank.num_negatives={bank.num_negatives} must be >= 0 '
                     '(0: the whole bank).')
  if not 0.0 <= bank.momentum < 1.0:
    raise ValueError(f'config.membank.momentum={bank.momentum} must lie in [0, 1).')
  embeddings = losses.l2_normalize(
      jax.random.normal(key, (run.num_examples, config.head.out_dim), jnp.float32))
  padding = bank_rows(run) - run.num_examples
  return {'bank': jnp.pad(embeddings, ((0, padding), (0, 0)))}


def state_specs(config):
  del config
  return {'bank': P(parallel.AXIS)}


def _shard_position(bank_shard, axis_name):
  """(this device's index, rows per shard)."""
  device = 0 if axis_name is None else jax.lax.axis_index(axis_name)
  return device, bank_shard.shape[0]


def _gather(x, axis_name):
  return x if axis_name is None else jax.lax.all_gather(x, axis_name, tiled=True)


def _owned_rows(global_rows, bank_shard, axis_name):
  """Which global rows this device's shard holds, and their local positions."""
  device, rows = _shard_position(bank_shard, axis_name)
  local = global_rows - device * rows
  owned = (local >= 0) & (local < rows)
  return owned, jnp.clip(local, 0, rows - 1)


def read_rows(bank_shard, global_rows, axis_name):
  """Bank rows at ``global_rows`` (the same indices on every device)."""
  owned, local = _owned_rows(global_rows, bank_shard, axis_name)
  values = jnp.where(owned[:, None], bank_shard[local], 0.0)
  return values if axis_name is None else jax.lax.psum(values, axis_name)


def loss(model, params, batch_stats, method_state, inputs, key, config, run, axis_name):
  bank, shard = config.membank, method_state['bank']
  index = inputs['index']
  (features, queries), updates = model.apply(
      {'params': params, 'batch_stats': batch_stats}, inputs['view1'], train=True,
      mutable=['batch_stats'])
  device, rows = _shard_position(shard, axis_name)
  batch_index = _gather(index, axis_name)                    # [N]
  # Every replica reads the whole batch's rows; each keeps its own images' ones.
  positives = jax.lax.dynamic_slice_in_dim(read_rows(shard, batch_index, axis_name),
                                           device * index.shape[0], index.shape[0])
  if bank.num_negatives:
    drawn = jax.random.randint(key, (bank.num_negatives,), 0, run.num_examples)
    owned, local_rows = _owned_rows(drawn, shard, axis_name)
    negatives, negative_rows = shard[local_rows], drawn
  else:
    negative_rows = device * rows + jnp.arange(rows)
    owned, negatives = negative_rows < run.num_examples, shard
  # An image's own row is its positive, never one of its negatives.
  mask = owned[None, :] & (negative_rows[None, :] != batch_index[:, None])
  value = losses.info_nce(queries, jax.lax.stop_gradient(positives), negatives,
                          bank.temperature, axis_name=axis_name, negative_mask=mask)
  for_update = {'embeddings': losses.l2_normalize(jax.lax.stop_gradient(queries)),
                'index': index}
  return value, {'batch_stats': updates['batch_stats'], 'for_update': for_update,
                 'metrics': {}, 'features': features}


def update_method_state(method_state, params, for_update, step, config, run, axis_name):
  """Each seen image's row <- normalise(m * row + (1 - m) * its new embedding)."""
  del params, step, run
  shard = method_state['bank']
  index = _gather(for_update['index'], axis_name)
  embeddings = _gather(for_update['embeddings'], axis_name)
  owned, local = _owned_rows(index, shard, axis_name)
  momentum = config.membank.momentum
  updated = losses.l2_normalize(momentum * shard[local] + (1.0 - momentum) * embeddings)
  # Rows another device owns are written out of range, and dropped.
  target = jnp.where(owned, local, shard.shape[0])
  return {'bank': shard.at[target].set(updated, mode='drop')}


encode = models.encoder_features

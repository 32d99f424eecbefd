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
from jax.sharding import PartitionSpec as P

from contrastive import losses
from contrastive import parallel
from contrastive.methods import rows
from contrastive.methods.contract import Batch, Context, LossOutput, Method, two_views


def check_config(config) -> list[str]:
  bank, problems = config.membank, []
  if bank.num_negatives < 0:
    problems.append(f'config.membank.num_negatives={bank.num_negatives} must be >= 0 '
                    '(0: the whole bank).')
  if not 0.0 <= bank.momentum < 1.0:
    problems.append(f'config.membank.momentum={bank.momentum} must lie in [0, 1).')
  if bank.temperature <= 0:
    problems.append(f'config.membank.temperature={bank.temperature} must be > 0.')
  return problems


def check_run(config, run) -> list[str]:
  drawn = config.membank.num_negatives
  if drawn >= run.num_examples:
    return [f'config.membank.num_negatives={drawn} is not smaller than the training split '
            f'({run.num_examples} images): the draws would count rows of the bank several '
            f'times over; use at most {run.num_examples - 1}, or 0 for the whole bank.']
  return []


def init_state(ctx: Context, variables, key):
  del variables
  run = ctx.run
  embeddings = losses.l2_normalize(
      jax.random.normal(key, (run.num_examples, ctx.config.head.out_dim), jnp.float32))
  padding = rows.padded_rows(run.num_examples, run.num_devices) - run.num_examples
  return {'bank': jnp.pad(embeddings, ((0, padding), (0, 0)))}


def state_specs(config):
  del config
  return {'bank': P(parallel.AXIS)}


def loss(ctx: Context, params, batch_stats, method_state, batch: Batch, key) -> LossOutput:
  bank, shard, axis_name = ctx.config.membank, method_state['bank'], ctx.axis_name
  index = batch.index
  (features, queries), updates = ctx.model.apply(
      {'params': params, 'batch_stats': batch_stats}, batch.views[0], train=True,
      mutable=['batch_stats'])
  device, _ = rows.shard_position(shard, axis_name)
  batch_index = rows.gather(index, axis_name)                # [N]
  # Every replica reads the whole batch's rows; each keeps its own images' ones.
  positives = jax.lax.dynamic_slice_in_dim(rows.read(shard, batch_index, axis_name),
                                           device * index.shape[0], index.shape[0])
  if bank.num_negatives:
    drawn = jax.random.randint(key, (bank.num_negatives,), 0, ctx.run.num_examples)
    owned, local_rows = rows.owned(drawn, shard, axis_name)
    negatives, negative_rows = shard[local_rows], drawn
  else:
    negative_rows = rows.shard_columns(shard, axis_name)
    owned, negatives = negative_rows < ctx.run.num_examples, shard
  # An image's own row is its positive, never one of its negatives.
  mask = owned[None, :] & (negative_rows[None, :] != batch_index[:, None])
  value = losses.info_nce(queries, jax.lax.stop_gradient(positives), negatives,
                          bank.temperature, axis_name=axis_name, negative_mask=mask)
  for_update = {'embeddings': losses.l2_normalize(jax.lax.stop_gradient(queries)),
                'index': index}
  return LossOutput(loss=value, batch_stats=updates['batch_stats'], features=features,
                    for_update=for_update)


def update_state(ctx: Context, method_state, params, for_update, step):
  """Each seen image's row <- normalise(m * row + (1 - m) * its new embedding)."""
  del params, step
  shard, axis_name = method_state['bank'], ctx.axis_name
  index = rows.gather(for_update['index'], axis_name)
  embeddings = rows.gather(for_update['embeddings'], axis_name)
  _, local = rows.owned(index, shard, axis_name)
  momentum = ctx.config.membank.momentum
  updated = losses.l2_normalize(momentum * shard[local] + (1.0 - momentum) * embeddings)
  return {'bank': rows.write(shard, index, updated, axis_name)}


def views(config):
  """One view: its embedding is both the query and the bank's new row."""
  return two_views(config)[:1]


METHOD = Method(name='membank', loss=loss, views=views, check_config=check_config,
                check_run=check_run, init_state=init_state, state_specs=state_specs, update_state=update_state)

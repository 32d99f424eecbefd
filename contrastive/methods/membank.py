"""Instance discrimination with a memory bank (Wu et al. 2018).

Every training image is its own class. The bank stores one L2-normalised
embedding per image, refreshed with momentum each time the image is seen; the
query is the network's embedding of one view, its positive is the image's own
bank row, and the negatives are bank rows sampled uniformly (or the whole bank).

The bank, its split across devices and its draws are
:mod:`contrastive.methods.bank`'s, which CMC shares.
"""

import jax
import ml_collections
from jax.sharding import PartitionSpec as P

from contrastive import losses
from contrastive import parallel
from contrastive.methods import bank as bank_lib
from contrastive.methods.contract import (Batch, Context, LossOutput, Method, forward,
                                          replica_key, two_views)


def default_config() -> ml_collections.ConfigDict:
  section = ml_collections.ConfigDict()
  section.num_negatives = 4096      # bank rows drawn per step; 0: the whole bank
  section.momentum = 0.5            # bank row <- m * row + (1 - m) * new embedding
  section.temperature = 0.07
  return section


def check_config(config) -> list[str]:
  section = config.membank
  problems = bank_lib.problems(section.num_negatives, section.momentum,
                               'membank.num_negatives', 'membank.momentum')
  if section.temperature <= 0:
    problems.append(f'config.membank.temperature={section.temperature} must be > 0.')
  return problems


def check_run(config, run) -> list[str]:
  return bank_lib.split_problems('membank.num_negatives', config.membank.num_negatives,
                                 run.num_examples)


def init_state(ctx: Context, variables, key):
  del variables
  return {'bank': bank_lib.init(key, ctx.run.num_examples, ctx.run.num_devices,
                                ctx.config.head.out_dim)}


def state_specs(config):
  del config
  return {'bank': P(parallel.AXIS)}


def loss(ctx: Context, params, model_state, method_state, batch: Batch, key) -> LossOutput:
  section, shard, axis_name = ctx.config.membank, method_state['bank'], ctx.axis_name
  (features, queries), model_state = forward(ctx.model, {'params': params, **model_state},
                                             batch.views[0], replica_key(key, axis_name))
  negatives = bank_lib.draw_negatives(key, shard, batch.index, section.num_negatives,
                                      ctx.run.num_examples, axis_name)
  value = bank_lib.loss(queries, shard, negatives, section.temperature, axis_name)
  for_update = {'embeddings': losses.l2_normalize(jax.lax.stop_gradient(queries)),
                'index': batch.index}
  return LossOutput(loss=value, model_state=model_state, features=features,
                    for_update=for_update)


def update_state(ctx: Context, method_state, params, for_update, step):
  del params, step
  return {'bank': bank_lib.update(method_state['bank'], for_update['index'],
                                  for_update['embeddings'], ctx.config.membank.momentum,
                                  ctx.axis_name)}


def views(config):
  """One view: its embedding is both the query and the bank's new row."""
  return two_views(config)[:1]


METHOD = Method(name='membank', loss=loss, default_config=default_config, views=views,
                check_config=check_config, check_run=check_run, init_state=init_state,
                state_specs=state_specs, update_state=update_state)

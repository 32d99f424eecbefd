"""Contrastive Multiview Coding (Tian et al. 2019) with the L and ab views of an image.

Each image gets one augmented view (``config.aug``; CMC's own recipe is a random
resized crop and a flip, before the colour conversion). The network
(:mod:`contrastive.models.lab_split`) converts it to CIE Lab and normalises L and
ab itself, so ``config.aug.mean`` must be None; L and ab each go through their
own ResNet and projection head. The loss runs in both directions and sums them,
as CMC's code does: L's embedding is the anchor against ab's positive and ab's
negatives, and ab's against L's, both with temperature ``cmc.temperature``; the
two are also logged, as ``l_loss`` and ``ab_loss``. Evaluation and export use
both encoders' features, concatenated. The ab view of a greyscale image is
zeros: CMC learns from colour images only.

The negatives, ``config.cmc.negatives``:

- ``'membank'``: one memory bank per view, one row per training image, split
  across devices by rows and updated with momentum ``bank_momentum``
  (:mod:`contrastive.methods.bank`, the memory bank's). An anchor's positive is
  the other view's row of its image; its negatives are ``num_negatives`` rows
  drawn uniformly (the same rows in both banks), or the whole bank for 0, never
  its own image's row.
- ``'queue'``: MoCo-style. An EMA copy of the whole network (momentum
  ``momentum``) is each view's key encoder, and each view has one global FIFO
  queue of ``queue_size`` keys, split across devices
  (:mod:`contrastive.methods.queue`). An anchor's positive is the other
  view's key of its image; its negatives are the other view's queue. The key
  encoders' BatchNorm is the model's (``model.bn``), with no shuffling.
"""

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import PartitionSpec as P

from contrastive import losses
from contrastive import models
from contrastive import parallel
from contrastive.methods import bank as bank_lib
from contrastive.methods import ema
from contrastive.methods import queue as queue_lib
from contrastive.methods.contract import (Batch, Context, LossOutput, Method, View, forward,
                                          mean_statistics, replica_key)
from contrastive.models import lab_split

NEGATIVES = ('membank', 'queue')
VIEWS = lab_split.VIEWS
OTHER = {'l': 'ab', 'ab': 'l'}       # whose bank or keys each view's anchors meet


def default_config() -> ml_collections.ConfigDict:
  section = ml_collections.ConfigDict()
  section.temperature = 0.07          # both directions' (CMC: 0.07 ImageNet, 0.1 STL-10)
  section.negatives = 'membank'       # 'membank' (one bank per view) or 'queue' (MoCo-style)
  section.num_negatives = 4096        # memory bank rows drawn per step; 0: the whole bank
  section.bank_momentum = 0.5         # bank row <- m * row + (1 - m) * new embedding
  section.queue_size = 16384          # 'queue': keys per view, multiple of the batch
  section.momentum = 0.999            # 'queue': the key encoders' EMA momentum
  return section


def build_model(config):
  return lab_split.build_model(config.model, config.head)


def backbone(config, axis_name=None):
  """Both views' encoders: their features concatenated, L's first."""
  return models.with_bn_axis(lab_split.build_encoder(config.model), axis_name)


def views(config):
  """One view: L and ab are split from it inside the network."""
  return (View(config.aug, config.data.image_size, 'aug'),)


def check_config(config) -> list[str]:
  cmc, problems = config.cmc, []
  if cmc.temperature <= 0:
    problems.append(f'config.cmc.temperature={cmc.temperature} must be > 0.')
  if cmc.negatives not in NEGATIVES:
    problems.append(f'config.cmc.negatives={cmc.negatives!r}; valid: {", ".join(NEGATIVES)}')
  elif cmc.negatives == 'membank':
    problems += bank_lib.problems(cmc.num_negatives, cmc.bank_momentum,
                                  'cmc.num_negatives', 'cmc.bank_momentum')
  else:
    if not 0.0 <= cmc.momentum <= 1.0:
      problems.append(f'config.cmc.momentum={cmc.momentum} must lie in [0, 1].')
    batch = config.global_batch_size
    problems += queue_lib.size_problems('cmc.queue_size', cmc.queue_size, batch,
                                        f'the global batch {batch}')
  if config.aug.mean is not None:
    problems.append(f'config.aug.mean={config.aug.mean!r}: CMC converts RGB in [0, 1] to '
                    'Lab and normalises L and ab itself; leave config.aug.mean and '
                    'config.aug.std None.')
  return problems


def check_run(config, run) -> list[str]:
  cmc = config.cmc
  if cmc.negatives == 'membank':
    return bank_lib.split_problems('cmc.num_negatives', cmc.num_negatives,
                                   run.num_examples, 'the banks')
  return queue_lib.split_problems('cmc.queue_size', cmc.queue_size,
                                  config.global_batch_size, run.num_examples, 'the queues')


def init_state(ctx: Context, variables, key):
  config, run = ctx.config, ctx.run
  keys = dict(zip(VIEWS, jax.random.split(key, len(VIEWS))))
  dim = config.head.out_dim
  if config.cmc.negatives == 'membank':
    return {'bank': {view: bank_lib.init(keys[view], run.num_examples, run.num_devices, dim)
                     for view in VIEWS}}
  return {'target': ema.init(variables),
          'queue': {view: queue_lib.random_keys(keys[view], config.cmc.queue_size, dim)
                    for view in VIEWS},
          queue_lib.POINTER: queue_lib.init_pointer()}


def state_specs(config):
  if config.cmc.negatives == 'membank':
    return {'bank': P(parallel.AXIS)}
  return {'target': P(), **queue_lib.specs()}


def loss(ctx: Context, params, model_state, method_state, batch: Batch, key) -> LossOutput:
  images = batch.views[0]
  (features, projections), model_state = forward(
      ctx.model, {'params': params, **model_state}, images, replica_key(key, ctx.axis_name))
  anchors = dict(zip(VIEWS, projections))
  if ctx.config.cmc.negatives == 'membank':
    per_view, for_update = _bank_losses(ctx, anchors, method_state['bank'], batch.index, key)
  else:
    per_view, for_update = _queue_losses(ctx, anchors, method_state, images)
  return LossOutput(loss=sum(per_view.values()), model_state=model_state,
                    features=features, for_update=for_update,
                    metrics={f'{view}_loss': value for view, value in per_view.items()})


def _bank_losses(ctx: Context, anchors, banks, index, key):
  """Each view's loss against the other view's bank, and what the banks' update needs."""
  cmc, axis_name = ctx.config.cmc, ctx.axis_name
  negatives = bank_lib.draw_negatives(key, banks[VIEWS[0]], index, cmc.num_negatives,
                                      ctx.run.num_examples, axis_name)   # split alike
  per_view = {view: bank_lib.loss(anchors[view], banks[OTHER[view]], negatives,
                                  cmc.temperature, axis_name) for view in VIEWS}
  embeddings = {view: losses.l2_normalize(jax.lax.stop_gradient(anchors[view]))
                for view in VIEWS}
  return per_view, {'embeddings': embeddings, 'index': index}


def _queue_losses(ctx: Context, anchors, method_state, images):
  """Each view's loss against the other view's keys and queue, and the new keys."""
  cmc, axis_name = ctx.config.cmc, ctx.axis_name
  (_, key_projections), target_state = ema.forward(ctx.model, method_state['target'], images)
  if ctx.config.model.bn == 'local':
    target_state = mean_statistics(target_state, axis_name)
  keys = {view: losses.l2_normalize(k) for view, k in zip(VIEWS, key_projections)}
  per_view = {view: losses.info_nce(anchors[view], keys[OTHER[view]],
                                    method_state['queue'][OTHER[view]], cmc.temperature,
                                    axis_name=axis_name)
              for view in VIEWS}
  return per_view, {'keys': keys, 'target_model_state': target_state}


def update_state(ctx: Context, method_state, params, for_update, step):
  del step
  cmc, axis_name = ctx.config.cmc, ctx.axis_name
  if cmc.negatives == 'membank':
    return {'bank': {view: bank_lib.update(method_state['bank'][view], for_update['index'],
                                           for_update['embeddings'][view],
                                           cmc.bank_momentum, axis_name)
                     for view in VIEWS}}
  pointer = method_state[queue_lib.POINTER]
  queues = {}
  for view in VIEWS:     # the same pointer: both queues take one key per image
    queues[view], new_pointer = queue_lib.enqueue(method_state['queue'][view], pointer,
                                                  for_update['keys'][view], axis_name,
                                                  cmc.queue_size)
  return {'target': ema.update(method_state['target'], params,
                               for_update['target_model_state'],
                               jnp.asarray(cmc.momentum, jnp.float32)),
          'queue': queues, queue_lib.POINTER: new_pointer}


METHOD = Method(name='cmc', loss=loss, default_config=default_config,
                build_model=build_model, backbone=backbone, views=views,
                check_config=check_config, check_run=check_run, init_state=init_state,
                state_specs=state_specs, update_state=update_state)

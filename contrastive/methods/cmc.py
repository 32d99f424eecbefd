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
  across devices by rows and updated with momentum ``bank_momentum`` as in
  :mod:`contrastive.methods.membank`. An anchor's positive is the other view's
  row of its image; its negatives are ``num_negatives`` rows drawn uniformly (the
  same rows in both banks), or the whole bank for 0, never its own image's row.
- ``'queue'``: MoCo-style. An EMA copy of the whole network (momentum
  ``momentum``) is each view's key encoder, and each view has one global FIFO
  queue of ``queue_size`` keys, split across devices
  (:func:`contrastive.methods.moco.enqueue`). An anchor's positive is the other
  view's key of its image; its negatives are the other view's queue. The key
  encoders' BatchNorm is the model's (``model.bn``), with no shuffling.
"""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from contrastive import losses
from contrastive import parallel
from contrastive.methods import ema
from contrastive.methods import moco
from contrastive.methods import rows
from contrastive.methods.contract import Batch, Context, LossOutput, Method, View
from contrastive.models import lab_split

NEGATIVES = ('membank', 'queue')
VIEWS = lab_split.VIEWS
OTHER = {'l': 'ab', 'ab': 'l'}       # whose bank or keys each view's anchors meet


def build_model(config):
  return lab_split.build_model(config.model, config.head)


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
    if cmc.num_negatives < 0:
      problems.append(f'config.cmc.num_negatives={cmc.num_negatives} must be >= 0 '
                      '(0: the whole bank).')
    if not 0.0 <= cmc.bank_momentum < 1.0:
      problems.append(f'config.cmc.bank_momentum={cmc.bank_momentum} must lie in [0, 1).')
  else:
    if not 0.0 <= cmc.momentum <= 1.0:
      problems.append(f'config.cmc.momentum={cmc.momentum} must lie in [0, 1].')
    batch = config.global_batch_size
    if batch > 0 and (cmc.queue_size <= 0 or cmc.queue_size % batch):
      problems.append(
          f'config.cmc.queue_size={cmc.queue_size} must be a positive multiple of the '
          f'keys enqueued per step, the global batch {batch}; try '
          f'{max(1, cmc.queue_size // batch) * batch}.')
  if config.aug.mean is not None:
    problems.append(f'config.aug.mean={config.aug.mean!r}: CMC converts RGB in [0, 1] to '
                    'Lab and normalises L and ab itself; leave config.aug.mean and '
                    'config.aug.std None.')
  return problems


def check_run(config, run) -> list[str]:
  cmc = config.cmc
  if cmc.negatives == 'membank' and cmc.num_negatives >= run.num_examples:
    return [f'config.cmc.num_negatives={cmc.num_negatives} is not smaller than the '
            f'training split ({run.num_examples} images): the draws would count rows of '
            f'the banks several times over; use at most {run.num_examples - 1}, or 0 for '
            'the whole bank.']
  if cmc.negatives == 'queue' and cmc.queue_size > run.num_examples:
    batch = config.global_batch_size
    return [f'config.cmc.queue_size={cmc.queue_size} is larger than the training split '
            f'({run.num_examples} images): the queues would hold keys of the very images '
            f'in the batch, positives as negatives; use at most '
            f'{run.num_examples // batch * batch}.']
  return []


def _random_rows(key, num_rows: int, dim: int):
  return losses.l2_normalize(jax.random.normal(key, (num_rows, dim), jnp.float32))


def init_state(ctx: Context, variables, key):
  config, run = ctx.config, ctx.run
  keys = dict(zip(VIEWS, jax.random.split(key, len(VIEWS))))
  dim = config.head.out_dim
  if config.cmc.negatives == 'membank':
    padding = rows.padded_rows(run.num_examples, run.num_devices) - run.num_examples
    return {'bank': {view: jnp.pad(_random_rows(keys[view], run.num_examples, dim),
                                   ((0, padding), (0, 0))) for view in VIEWS}}
  return {'target': ema.init(variables),
          'queue': {view: _random_rows(keys[view], config.cmc.queue_size, dim)
                    for view in VIEWS},
          'queue_pointer': jnp.zeros((), jnp.int32)}


def state_specs(config):
  if config.cmc.negatives == 'membank':
    return {'bank': P(parallel.AXIS)}
  return {'target': P(), 'queue': P(parallel.AXIS), 'queue_pointer': P()}


def loss(ctx: Context, params, batch_stats, method_state, batch: Batch, key) -> LossOutput:
  images = batch.views[0]
  (features, projections), updates = ctx.model.apply(
      {'params': params, 'batch_stats': batch_stats}, images, train=True,
      mutable=['batch_stats'])
  anchors = dict(zip(VIEWS, projections))
  if ctx.config.cmc.negatives == 'membank':
    per_view, for_update = _bank_losses(ctx, anchors, method_state['bank'], batch.index, key)
  else:
    per_view, for_update = _queue_losses(ctx, anchors, method_state, images)
  return LossOutput(loss=sum(per_view.values()), batch_stats=updates['batch_stats'],
                    features=features, for_update=for_update,
                    metrics={f'{view}_loss': value for view, value in per_view.items()})


def _bank_losses(ctx: Context, anchors, banks, index, key):
  """Each view's loss against the other view's bank, and what the banks' update needs."""
  cmc, axis_name = ctx.config.cmc, ctx.axis_name
  layout = banks[VIEWS[0]]                                   # both banks split alike
  device, _ = rows.shard_position(layout, axis_name)
  batch_index = rows.gather(index, axis_name)                # [N]
  if cmc.num_negatives:
    drawn = jax.random.randint(key, (cmc.num_negatives,), 0, ctx.run.num_examples)
    owned, local_rows = rows.owned(drawn, layout, axis_name)
    negative_rows, pick = drawn, lambda bank: bank[local_rows]
  else:
    negative_rows = rows.shard_columns(layout, axis_name)
    owned, pick = negative_rows < ctx.run.num_examples, lambda bank: bank
  # An image's own row is its positive, never one of its negatives.
  mask = owned[None, :] & (negative_rows[None, :] != batch_index[:, None])
  per_view = {}
  for view in VIEWS:
    bank = banks[OTHER[view]]
    # Every replica reads the whole batch's rows; each keeps its own images' ones.
    positives = jax.lax.dynamic_slice_in_dim(rows.read(bank, batch_index, axis_name),
                                             device * index.shape[0], index.shape[0])
    per_view[view] = losses.info_nce(anchors[view], jax.lax.stop_gradient(positives),
                                     pick(bank), cmc.temperature, axis_name=axis_name,
                                     negative_mask=mask)
  embeddings = {view: losses.l2_normalize(jax.lax.stop_gradient(anchors[view]))
                for view in VIEWS}
  return per_view, {'embeddings': embeddings, 'index': index}


def _queue_losses(ctx: Context, anchors, method_state, images):
  """Each view's loss against the other view's keys and queue, and the new keys."""
  cmc, axis_name = ctx.config.cmc, ctx.axis_name
  (_, key_projections), target_batch_stats = ema.forward(ctx.model, method_state['target'],
                                                         images)
  if ctx.config.model.bn == 'local' and axis_name is not None:
    target_batch_stats = jax.lax.pmean(target_batch_stats, axis_name)
  keys = {view: losses.l2_normalize(k) for view, k in zip(VIEWS, key_projections)}
  per_view = {view: losses.info_nce(anchors[view], keys[OTHER[view]],
                                    method_state['queue'][OTHER[view]], cmc.temperature,
                                    axis_name=axis_name)
              for view in VIEWS}
  return per_view, {'keys': keys, 'target_batch_stats': target_batch_stats}


def update_state(ctx: Context, method_state, params, for_update, step):
  del step
  cmc, axis_name = ctx.config.cmc, ctx.axis_name
  if cmc.negatives == 'membank':
    # Each seen image's row <- normalise(m * row + (1 - m) * its new embedding).
    index = rows.gather(for_update['index'], axis_name)
    banks = {}
    for view in VIEWS:
      shard = method_state['bank'][view]
      embeddings = rows.gather(for_update['embeddings'][view], axis_name)
      _, local = rows.owned(index, shard, axis_name)
      mixed = cmc.bank_momentum * shard[local] + (1.0 - cmc.bank_momentum) * embeddings
      banks[view] = rows.write(shard, index, losses.l2_normalize(mixed), axis_name)
    return {'bank': banks}
  pointer = method_state['queue_pointer']
  queues = {}
  for view in VIEWS:     # the same pointer: both queues take one key per image
    queues[view], new_pointer = moco.enqueue(method_state['queue'][view], pointer,
                                             for_update['keys'][view], axis_name,
                                             cmc.queue_size)
  return {'target': ema.update(method_state['target'], params,
                               for_update['target_batch_stats'],
                               jnp.asarray(cmc.momentum, jnp.float32)),
          'queue': queues, 'queue_pointer': new_pointer}


METHOD = Method(name='cmc', loss=loss, build_model=build_model, views=views,
                check_config=check_config, check_run=check_run, init_state=init_state,
                state_specs=state_specs, update_state=update_state)

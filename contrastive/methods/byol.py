"""BYOL (Grill et al. 2020): the online network predicts an EMA target's projection.

No negatives. The online network is encoder -> projector (``config.head``) ->
predictor (``config.predictor``); the target is an EMA copy of encoder and
projector (:mod:`contrastive.methods.ema`), its momentum rising from
``config.byol.momentum`` to 1 on a cosine over the run. Each view's prediction
regresses the target's projection of the other view: the normalised MSE
``2 - 2 cos(p, z')``, summed over both directions, averaged over the global
batch. The two views differ: ``config.aug`` (the paper: blur always, no solarize)
and ``config.aug2`` (blur 0.1, solarize 0.2).

Both views go through each network as one batch, so BatchNorm (synchronised
across replicas with ``model.bn='global'``) normalises over both views.
"""

import jax.numpy as jnp
import ml_collections

from contrastive import config_checks
from contrastive import losses
from contrastive import models
from contrastive.methods import ema
from contrastive.methods.contract import (Batch, Context, LossOutput, Method, View, forward,
                                          mean_statistics, replica_key)

ONLINE_ONLY = ('predictor',)      # what the target does not copy


def default_config() -> ml_collections.ConfigDict:
  section = ml_collections.ConfigDict()
  section.momentum = 0.996             # target EMA, rising to 1 on the cosine schedule
  section.momentum_schedule = 'cosine'
  return section


def build_model(config):
  return models.build_model_with_predictor(config.model, config.head, config.predictor)


def views(config) -> tuple[View, View]:
  """Asymmetric views: ``config.aug`` for the first, ``config.aug2`` for the second."""
  size = config.data.image_size
  return View(config.aug, size, 'aug'), View(config.aug2, size, 'aug2')


def check_config(config) -> list[str]:
  return ema.check(config.byol, 'byol') + config_checks.predictor_problems(config)


def init_state(ctx: Context, variables, key):
  del ctx, key
  return {'target': ema.init(variables, without=ONLINE_ONLY)}


def online_and_target(ctx: Context, params, model_state, target, views_, key):
  """Both views through the online network (with the predictor) and the target.

  Returns ``(features, predictions, target_projections, online_model_state,
  target_model_state)``, rows ordered view 1 then view 2; the target's statistics
  are averaged over replicas when BatchNorm is per device.
  """
  both = jnp.concatenate(views_)
  (features, _, predictions), online_state = forward(
      ctx.model, {'params': params, **model_state}, both, replica_key(key, ctx.axis_name),
      method='predict')
  (_, projections), target_state = ema.forward(ctx.model, target, both)
  if ctx.config.model.bn == 'local':
    target_state = mean_statistics(target_state, ctx.axis_name)
  return features, predictions, projections, online_state, target_state


def swap_views(x):
  """Rows of view 2 then view 1: each view's partner."""
  half = x.shape[0] // 2
  return jnp.concatenate([x[half:], x[:half]])


def loss(ctx: Context, params, model_state, method_state, batch: Batch, key) -> LossOutput:
  n = batch.views[0].shape[0]
  features, predictions, projections, online_state, target_state = online_and_target(
      ctx, params, model_state, method_state['target'], batch.views, key)
  # The mean over 2n rows of both directions, times 2: the sum of the two losses.
  value = 2.0 * losses.normalized_mse(predictions, swap_views(projections), ctx.axis_name)
  return LossOutput(loss=value, model_state=online_state, features=features[:n],
                    for_update={'target_model_state': target_state})


def update_target(ctx: Context, method_state, params, for_update, step, section):
  """The target after the optimizer step, with ``section``'s momentum schedule."""
  momentum = ema.momentum_at(step, section.momentum, section.momentum_schedule,
                             ctx.run.total_steps)
  return {'target': ema.update(method_state['target'], params,
                               for_update['target_model_state'], momentum)}


def update_state(ctx: Context, method_state, params, for_update, step):
  return update_target(ctx, method_state, params, for_update, step, ctx.config.byol)


METHOD = Method(name='byol', loss=loss, default_config=default_config,
                build_model=build_model, views=views,
                check_config=check_config, init_state=init_state,
                update_state=update_state)

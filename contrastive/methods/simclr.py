"""SimCLR (Chen et al. 2020): the other views of the global batch are the negatives."""

import jax.numpy as jnp

from contrastive import losses
from contrastive.methods.contract import Batch, Context, LossOutput, Method


def loss(ctx: Context, params, batch_stats, method_state, batch: Batch, key) -> LossOutput:
  """Both views go through the network as one batch, so BN sees both."""
  del method_state, key
  view1, view2 = batch.views
  n = view1.shape[0]
  (features, projections), updates = ctx.model.apply(
      {'params': params, 'batch_stats': batch_stats},
      jnp.concatenate([view1, view2]), train=True, mutable=['batch_stats'])
  value = losses.nt_xent(projections[:n], projections[n:], ctx.config.simclr.temperature,
                         axis_name=ctx.axis_name)
  return LossOutput(loss=value, batch_stats=updates['batch_stats'], features=features[:n])


def check_config(config) -> list[str]:
  if config.simclr.temperature <= 0:
    return [f'config.simclr.temperature={config.simclr.temperature} must be > 0.']
  return []


METHOD = Method(name='simclr', loss=loss, check_config=check_config)

"""SimCLR (Chen et al. 2020): the other views of the global batch are the negatives."""

import jax.numpy as jnp
import ml_collections
from jax.sharding import PartitionSpec as P

from contrastive import losses
from contrastive import models


def build_model(config: ml_collections.ConfigDict):
  return models.build_model(config.model, config.head)


def init_method_state(config, variables, run, key):
  del config, variables, run, key
  return {}


def state_specs(config):
  del config
  return P()


def loss(model, params, batch_stats, method_state, inputs, key, config, run, axis_name):
  """Both views go through the network as one batch, so BN sees both."""
  del method_state, key, run
  view1, view2 = inputs['view1'], inputs['view2']
  n = view1.shape[0]
  (features, projections), updates = model.apply(
      {'params': params, 'batch_stats': batch_stats},
      jnp.concatenate([view1, view2]), train=True, mutable=['batch_stats'])
  value = losses.nt_xent(projections[:n], projections[n:],
                         config.simclr.temperature, axis_name=axis_name)
  return value, {'batch_stats': updates['batch_stats'], 'for_update': {}, 'metrics': {},
                 'features': features[:n]}


def update_method_state(method_state, params, for_update, step, config, run, axis_name):
  del params, for_update, step, config, run, axis_name
  return method_state


encode = models.encoder_features

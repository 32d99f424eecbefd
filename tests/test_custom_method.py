"""A complete method written outside the library, trained by the real trainer.

The method below is the second example of docs/writing-a-method.md: two asymmetric views
(the second one smaller and solarized, from its own config section), an online
network with a predictor, an EMA target network, and a symmetrised
cosine-similarity loss. It uses only the public contract in
``contrastive.methods`` and changes no library file.
"""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from contrastive import loop
from contrastive import losses
from contrastive import metrics
from contrastive import models
from contrastive import parallel
from contrastive import train
from contrastive.data import augment_config
from contrastive.methods import Batch, Context, LossOutput, Method, View, ema
from contrastive.methods.contract import forward
from contrastive.models.heads import ProjectionHead


class Online(nn.Module):
  """Encoder -> projection head -> predictor; the target network skips the predictor."""
  encoder: nn.Module
  head: nn.Module
  predictor: nn.Module

  def __call__(self, images, train: bool):
    features, projection = self.project(images, train)
    return features, projection, self.predictor(projection, train=train)

  def project(self, images, train: bool):
    features = self.encoder(images, train=train)
    return features, self.head(features, train=train)


def build_model(config):
  encoder = models.build_encoder(config.model)

  def mlp():
    return ProjectionHead(num_layers=2, hidden_dim=64, out_dim=config.head.out_dim,
                          bn_axis_name=encoder.bn_axis_name)

  return Online(encoder, head=mlp(), predictor=mlp())


def views(config):
  return (View(config.aug, config.data.image_size, 'aug'),
          View(config.target_aug, config.cosine.target_size, 'target_aug'))


def check_config(config):
  return ema.check(config.cosine, 'cosine')


def init_state(ctx: Context, variables, key):
  del ctx, key
  return {'target': ema.init(variables)}


def loss(ctx: Context, params, model_state, method_state, batch: Batch, key) -> LossOutput:
  """2 - 2 cos(prediction of one view, target projection of the other), both ways."""
  del key
  seen_view_shapes.append(tuple(view.shape for view in batch.views))
  predictions, features = [], None
  for view in batch.views:                        # different sizes: one pass each
    (view_features, _, prediction), model_state = forward(
        ctx.model, {'params': params, **model_state}, view)
    features = view_features if features is None else features
    predictions.append(prediction)
  target, targets = method_state['target'], []
  for view in batch.views:
    (_, projection), target_state = ema.forward(ctx.model, target, view,
                                                method=Online.project)
    targets.append(projection)
    target = {'params': target['params'], **target_state}
  value = 0.0
  for prediction, other_view in zip(predictions, reversed(targets)):
    cosine = jnp.sum(losses.l2_normalize(prediction) * losses.l2_normalize(other_view), -1)
    value += jnp.mean(2.0 - 2.0 * cosine)
  value = jax.lax.pmean(value, ctx.axis_name)       # the global-batch loss
  return LossOutput(loss=value, model_state=model_state, features=features,
                    for_update=target_state)


def update_state(ctx: Context, method_state, params, for_update, step):
  cosine = ctx.config.cosine
  momentum = ema.momentum_at(step, cosine.momentum, cosine.momentum_schedule,
                             ctx.run.total_steps)
  return {'target': ema.update(method_state['target'], params, for_update, momentum)}


COSINE_EMA = Method(name='cosine_ema', loss=loss, build_model=build_model, views=views,
                    check_config=check_config, init_state=init_state,
                    update_state=update_state)
seen_view_shapes = []


def _config(config):
  config.method = 'cosine_ema'
  config.cosine = ml_collections.ConfigDict(
      {'momentum': 0.9, 'momentum_schedule': 'cosine', 'target_size': 12})
  config.target_aug = augment_config.simclr_augment_config(strength=0.5, blur_prob=0.0)
  config.target_aug.solarize_prob = 0.2
  config.eval.enabled = True
  config.eval.compare_random_init = False
  config.eval.probe_epochs = 2
  return config


def test_a_method_defined_here_trains_through_the_trainer_on_8_devices(config, tmp_path):
  assert jax.device_count() == 8
  config = _config(config)
  seen_view_shapes.clear()
  results = train.train_and_evaluate(config, str(tmp_path), method=COSINE_EMA)

  # The trainer built the views the method declared, per replica: 16 / 8 images.
  assert set(seen_view_shapes) == {((2, 16, 16, 3), (2, 12, 12, 3))}
  records = metrics.read_metrics(tmp_path)
  steps = sorted(step for step, record in records.items() if 'loss' in record)
  assert steps == list(range(1, 9))                 # 0.1 epoch of 1297 images / 16
  assert all(0.0 <= records[s]['loss'] <= 8.0 for s in steps)
  assert len({records[s]['loss'] for s in steps}) > 1
  # The online probe trained on the method's features; evaluation used its backbone
  # (the default: the network under 'encoder').
  assert 0.0 <= results['trained']['knn_accuracy'] <= 1.0
  assert 'online_probe_accuracy' in results['trained']

  # The EMA target moved away from its initial copy, and stays apart from the
  # online network (momentum 0.9 lags it).
  state = ocp.StandardCheckpointer().restore(
      os.path.join(tmp_path, 'checkpoints', '8', 'default'))
  initial = jax.device_get(train.init_state(
      COSINE_EMA, Context(build_model(config), config, None, 'data'),
      loop.optimizer(config.optim, config.global_batch_size, 10, 10).tx,
      parallel.make_mesh()))
  kernel = lambda params: np.asarray(params['head']['Dense_0']['kernel'])  # noqa: E731
  target = kernel(state['method_state']['target']['params'])
  assert not np.allclose(target, kernel(state['params']))
  assert not np.allclose(target, kernel(initial.method_state['target']['params']))


def test_its_config_section_is_checked_before_any_data_is_read(config, tmp_path):
  config = _config(config)
  config.cosine.momentum_schedule = 'linear'
  config.target_aug.solarize_prob = 1.5
  with pytest.raises(ValueError) as error:
    train.train_and_evaluate(config, str(tmp_path), method=COSINE_EMA)
  message = str(error.value)
  assert "config.cosine.momentum_schedule='linear'; valid: constant, cosine" in message
  assert 'config.target_aug.solarize_prob=1.5' in message

"""Learning-rate scaling and schedule, weight-decay / trust-ratio masks, models."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from contrastive import models
from contrastive import optim
from contrastive.config import base_config


def _optim(**fields):
  config = base_config().optim
  config.update(fields)
  return config


def test_learning_rate_scaling_rules():
  assert optim.scaled_learning_rate(_optim(base_lr=0.3, lr_scaling='linear'), 4096) == \
      pytest.approx(4.8)
  assert optim.scaled_learning_rate(_optim(base_lr=0.075, lr_scaling='sqrt'), 4096) == \
      pytest.approx(4.8)
  assert optim.scaled_learning_rate(_optim(base_lr=0.5, lr_scaling='none'), 4096) == 0.5
  with pytest.raises(ValueError, match='linear, sqrt, none'):
    optim.scaled_learning_rate(_optim(lr_scaling='cubic'), 256)


def test_warmup_then_cosine_to_zero():
  schedule = optim.learning_rate_schedule(2.0, warmup_steps=10, total_steps=110)
  assert float(schedule(0)) == 0.0
  assert float(schedule(5)) == pytest.approx(1.0)
  assert float(schedule(10)) == pytest.approx(2.0)
  assert float(schedule(60)) == pytest.approx(1.0, rel=1e-3)      # half-way down
  assert float(schedule(110)) == pytest.approx(0.0, abs=1e-6)
  values = [float(schedule(s)) for s in range(10, 111)]
  assert all(a >= b for a, b in zip(values, values[1:]))


def test_step_schedule_after_warmup():
  schedule = optim.learning_rate_schedule(0.03, warmup_steps=0, total_steps=200,
                                          decay='steps', boundaries=(120, 160))
  assert [float(schedule(s)) for s in (0, 119, 120, 159, 160, 199)] == pytest.approx(
      [0.03, 0.03, 0.003, 0.003, 0.0003, 0.0003])
  warm = optim.learning_rate_schedule(1.0, warmup_steps=4, total_steps=20, decay='steps',
                                      boundaries=(10,))
  assert [float(warm(s)) for s in (0, 2, 4, 9, 10, 19)] == pytest.approx(
      [0.0, 0.5, 1.0, 1.0, 0.1, 0.1])
  with pytest.raises(ValueError, match='inside the warmup'):
    optim.learning_rate_schedule(1.0, 4, 20, decay='steps', boundaries=(3,))
  with pytest.raises(ValueError, match=r"optim.schedule='linear'; valid: cosine, steps"):
    optim.learning_rate_schedule(1.0, 4, 20, decay='linear')


def test_biases_and_batchnorm_are_excluded_from_decay_and_trust_ratio():
  params = {'conv': {'kernel': jnp.ones((3, 3, 2, 4))}, 'bn': {'scale': jnp.ones(4),
                                                               'bias': jnp.ones(4)}}
  assert optim.decay_mask(params) == {'conv': {'kernel': True},
                                      'bn': {'scale': False, 'bias': False}}
  # With zero gradients, LARS and SGD move only the decayed kernel.
  for name in ('lars', 'sgd', 'adamw'):
    tx = optim.make_optimizer(_optim(name=name, weight_decay=0.1), 0.5)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    assert np.all(np.asarray(updates['conv']['kernel']) < 0), name
    np.testing.assert_array_equal(updates['bn']['scale'], 0)
    np.testing.assert_array_equal(updates['bn']['bias'], 0)


def test_unknown_optimizer_lists_valid_ones():
  with pytest.raises(ValueError, match='lars, sgd, adamw'):
    optim.make_optimizer(_optim(name='lamb'), 0.1)


@pytest.mark.parametrize('name, stem, width, size, features', [
    ('resnet18', 'cifar', 0.25, 32, 128),
    ('resnet50', 'imagenet', 0.125, 64, 256),
])
def test_resnet_feature_width_and_head(name, stem, width, size, features):
  model_config = ml_collections.ConfigDict(dict(
      name=name, width=width, stem=stem, bn='local', bn_momentum=0.9))
  head_config = ml_collections.ConfigDict(dict(num_layers=3, hidden_dim=0, out_dim=16,
                                               use_bn=True, output_bn=True))
  model = models.build_model(model_config, head_config)
  assert model.encoder.num_features == features
  variables = jax.eval_shape(lambda key: model.init(key, jnp.zeros((2, size, size, 3)),
                                                   train=False), jax.random.key(0))
  out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, size, size, 3)),
                                             train=False), variables)
  assert out[0].shape == (2, features) and out[1].shape == (2, 16)
  head = variables['params']['head']
  assert [head[f'Dense_{i}']['kernel'].shape for i in range(3)] == [
      (features, features), (features, features), (features, 16)]


@pytest.mark.parametrize('width, features', [(2.0, 4096), (3.0, 6144)])
def test_simclr_v2_wide_resnet50(width, features):
  """SimCLR v2's 2x and 3x ResNet-50: shapes only (``eval_shape``), nothing computed."""
  model_config = ml_collections.ConfigDict(dict(
      name='resnet50', width=width, stem='imagenet', bn='local', bn_momentum=0.9))
  encoder = models.build_encoder(model_config)
  assert encoder.num_features == features
  images = jnp.zeros((2, 64, 64, 3))
  variables = jax.eval_shape(lambda key: encoder.init(key, images, train=False),
                             jax.random.key(0))
  assert jax.eval_shape(lambda v: encoder.apply(v, images, train=False),
                        variables).shape == (2, features)
  assert variables['params']['stem_conv']['kernel'].shape == (7, 7, 3, int(64 * width))


def test_schedule_from_config_turns_epochs_into_steps():
  optim_config = _optim(warmup_epochs=1.0, schedule='steps', decay_epochs=(3.0,),
                        decay_factor=0.5)
  schedule = optim.schedule_from_config(optim_config, 2.0, steps_per_epoch=10,
                                        total_steps=50)
  assert [float(schedule(s)) for s in (5, 10, 29, 30, 49)] == pytest.approx(
      [1.0, 2.0, 2.0, 1.0, 1.0])


def test_a_vits_position_embedding_and_class_token_are_no_weights():
  """By role, not rank: a ViT's 3-D position embedding and class token, and its
  LayerNorm scales, are neither decayed nor trust-ratio scaled; every kernel is."""
  from contrastive.models import vit  # pylint: disable=g-import-not-at-top
  encoder = vit.build_vit('vit_tiny', patch_size=4, depth=1, hidden_dim=8, num_heads=2,
                          mlp_dim=16)
  params = jax.eval_shape(lambda: encoder.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)),
                                               train=False))['params']
  mask = optim.decay_mask(params)
  flat = {'/'.join(str(k.key) for k in path): value
          for path, value in jax.tree_util.tree_flatten_with_path(mask)[0]}
  assert not flat['pos_embed'] and not flat['cls_token']
  assert params['pos_embed'].ndim == 3
  assert {name for name, decayed in flat.items() if decayed} == {
      name for name in flat if name.endswith('kernel')}
  assert not any(decayed for name, decayed in flat.items() if 'norm' in name)

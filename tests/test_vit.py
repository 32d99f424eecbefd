"""The ViT encoder against timm's VisionTransformer, and its options' behaviour."""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
from timm.models import vision_transformer as timm_vit

from contrastive.formats import timm as timm_format
from contrastive.models import vit
from tests import tolerances

# Features computed by timm and by this encoder from the same weights differ by
# float32 rounding only: different summation orders in the convolution and
# matmuls, and different erf, softmax and rsqrt implementations. That is under
# 1e-6 of the features' largest magnitude for ViT-S/16 (12 blocks) and less for
# two blocks; the tolerance is relative to that scale, not per element, because
# features near zero carry the same absolute round-off. 1e-5 still fails timm's
# tanh GELU approximation (1.5e-4); LayerNorm epsilon 1e-5 instead of 1e-6 moves
# the features by about the tolerance itself, so it should be no looser.
FLOAT32_SCALE = 1e-5

TINY = dict(patch_size=8, depth=2, hidden_dim=32, num_heads=2, mlp_dim=64)
SIZE = 32                                      # 4 x 4 patches
CONFIGS = {
    'token': {},
    'gap': dict(pooling='gap'),
    'sincos': dict(position_embedding='sincos'),
    'frozen': dict(frozen_patch_projection=True),
    'gap_sincos_frozen': dict(pooling='gap', position_embedding='sincos',
                              frozen_patch_projection=True),
}


def images(batch, height=SIZE, width=None, seed=0):
  rng = np.random.default_rng(seed)
  return rng.standard_normal((batch, height, width or height, 3), dtype=np.float32)


def tiny(**fields):
  return vit.build_vit('vit_tiny', **TINY, **fields)


def init(encoder, x, key=0):
  return jax.jit(functools.partial(encoder.init, train=False))(jax.random.key(key), x)


@functools.cache
def _tiny_variables(config):
  return init(tiny(**CONFIGS[config]), images(1))


def tiny_variables(config='token'):
  return jax.tree.map(jnp.asarray, _tiny_variables(config))


def abstract_init(encoder, size=224):
  return jax.eval_shape(lambda: encoder.init(jax.random.key(0), jnp.zeros((2, size, size, 3)),
                                             train=False))


def random_variables(encoder, size, seed=0):
  """Every variable random, biases and LayerNorms included (an init's zero biases
  and unit scales would hide a misplaced one from a feature comparison); kernels
  at 1 / sqrt(fan_in), which keeps activations of order one."""
  rng = np.random.default_rng(seed)
  def draw(path, leaf):
    noise = rng.standard_normal(leaf.shape, dtype=np.float32)
    name = path[-1].key
    if name == 'kernel':
      return noise / np.sqrt(np.prod(leaf.shape[:-1]))
    return 1 + 0.2 * noise if name == 'scale' else 0.2 * noise
  return jax.tree_util.tree_map_with_path(draw, abstract_init(encoder, size))


def apply(encoder, variables, x, train=False, rngs=None):
  run = jax.jit(functools.partial(encoder.apply, train=train))
  return np.asarray(run(variables, x, rngs=rngs))


def timm_features(net, x):
  with torch.no_grad():
    return net.eval()(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()   # NCHW


def timm_net(build, *args, **kwargs):
  """A timm network with no weights yet (its random init costs seconds at ViT-S
  size): :func:`load_strictly` gives it the exported ones."""
  with torch.device('meta'):
    return build(*args, **kwargs)


def load_strictly(net, state):
  """``strict=True``: every name timm has, no other, each of its shape. ``assign``
  makes the exported arrays the network's tensors, in place of the empty ones."""
  net.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()},
                      strict=True, assign=True)
  assert not any(tensor.is_meta for tensor in net.state_dict().values())
  return net


def loss_of(features):
  """A fixed random projection of the features: not their sum of squares, which
  the final LayerNorm makes constant, with gradients of round-off only."""
  direction = np.random.default_rng(7).standard_normal(features.shape[-1], dtype=np.float32)
  return jnp.sum(features @ direction)


def count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


# ------------------------------------------------------------------ against timm

@pytest.mark.parametrize('name', ['vit_tiny', 'vit_small', 'vit_base'])
def test_parameter_count_and_feature_shape_match_timm(name):
  net = timm_net(timm.create_model, f'{name}_patch16_224', pretrained=False, num_classes=0)
  want = sum(p.numel() for p in net.parameters())
  for frozen in (False, True):
    encoder = vit.build_vit(name, frozen_patch_projection=frozen)
    variables = abstract_init(encoder)
    assert count(variables) == want
    features = jax.eval_shape(lambda v, e=encoder: e.apply(v, jnp.zeros((2, 224, 224, 3)),
                                                          train=False), variables)
    assert features.shape == (2, net.num_features) == (2, encoder.num_features)
    assert features.dtype == jnp.float32


@pytest.mark.parametrize('config', CONFIGS)
def test_vit_s16_export_loads_strictly_into_timm(config):
  encoder = vit.build_vit('vit_small', **CONFIGS[config])
  variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract_init(encoder))
  name = timm_format.timm_model_name(encoder, 224)
  assert name == 'vit_small_patch16_224'
  pooling = {} if encoder.pooling == 'token' else dict(global_pool='avg', class_token=False)
  net = timm_net(timm.create_model, name, pretrained=False, num_classes=0, **pooling)
  load_strictly(net, timm_format.timm_state_dict(encoder, variables, 224))


def test_vit_s16_features_match_timm():
  encoder = vit.build_vit('vit_small')
  variables = random_variables(encoder, 224)
  x = images(2, 224)
  net = timm_net(timm.create_model, 'vit_small_patch16_224', pretrained=False, num_classes=0)
  want = timm_features(load_strictly(net, timm_format.timm_state_dict(encoder, variables, 224)), x)
  tolerances.assert_close(apply(encoder, variables, x), want, rtol=0.0, scale=FLOAT32_SCALE)


@pytest.mark.parametrize('config', CONFIGS)
def test_features_match_timm(config):
  encoder = tiny(**CONFIGS[config])
  variables = random_variables(encoder, SIZE)
  x = images(2)
  net = timm_net(timm_vit.VisionTransformer, **timm_format.timm_kwargs(encoder, SIZE))
  want = timm_features(load_strictly(net, timm_format.timm_state_dict(encoder, variables, SIZE)), x)
  tolerances.assert_close(apply(encoder, variables, x), want, rtol=0.0, scale=FLOAT32_SCALE)


def test_init_is_timms_moco_init():
  """Per variable, the distribution of timm's ``weight_init='moco'`` (MoCo v3's):
  the same spread, and for the uniform dense kernels the same bound."""
  encoder = tiny()
  ours = timm_format.timm_state_dict(encoder, tiny_variables(), SIZE)
  torch.manual_seed(0)
  net = timm_vit.VisionTransformer(**timm_format.timm_kwargs(encoder, SIZE), weight_init='moco')
  for name, theirs in net.state_dict().items():
    if name.startswith('patch_embed'):
      continue         # timm keeps torch's conv init there; MoCo v3's is tested below
    theirs, mine = theirs.numpy(), ours[name]
    # Two samples' standard deviations differ by about 1 / sqrt(n) of it, their
    # means by about sqrt(2 / n) standard deviations: 4 to 5 times that passes.
    n = theirs.size
    np.testing.assert_allclose(mine.std(), theirs.std(), rtol=4 / np.sqrt(n), err_msg=name)
    np.testing.assert_allclose(mine.mean(), theirs.mean(), err_msg=name,
                               atol=5 * theirs.std() / np.sqrt(n) + 1e-12)
    if name.endswith('weight') and theirs.ndim == 2:      # uniform: the same bound
      np.testing.assert_allclose(np.abs(mine).max(), np.abs(theirs).max(), rtol=0.01,
                                 err_msg=name)


def test_timm_state_dict_refuses_what_it_cannot_name():
  encoder = tiny()
  variables = tiny_variables()
  extra = {'params': {**variables['params'], 'head': {'kernel': np.zeros((32, 8))}}}
  with pytest.raises(ValueError, match='params/head/kernel'):
    timm_format.timm_state_dict(encoder, extra, SIZE)
  # A frozen encoder's projection belongs in 'frozen': one in 'params' is unmapped.
  with pytest.raises(ValueError, match='params/patch_embed/kernel'):
    timm_format.timm_state_dict(tiny(frozen_patch_projection=True), variables, SIZE)
  with pytest.raises(ValueError, match='missing.*patch_embed.proj.weight'):
    timm_format.timm_state_dict(tiny(frozen_patch_projection=True),
                                {'params': tiny_variables('frozen')['params']}, SIZE)
  with pytest.raises(ValueError, match='position embedding has 17 tokens'):
    timm_format.timm_state_dict(encoder, variables, 2 * SIZE)


def test_timm_model_names_are_registered():
  registered = set(timm.list_models('vit_*'))
  for variant in vit.VARIANTS:
    for patch in (16, 8):
      name = timm_format.timm_model_name(vit.build_vit(variant, patch_size=patch), 224)
      assert name is None or name in registered
      assert (name is None) == (variant == 'vit_tiny' and patch == 8)   # timm has no Ti/8
  assert timm_format.timm_model_name(vit.build_vit('vit_small'), 256) is None
  assert timm_format.timm_model_name(tiny(), 224) is None


# ------------------------------------------------------------------------ options

def test_frozen_projection_is_model_state_not_params():
  encoder = tiny(frozen_patch_projection=True)
  variables = tiny_variables('frozen')
  assert set(variables['frozen']) == {'patch_embed'}
  assert 'patch_embed' not in variables['params']
  kernel = variables['frozen']['patch_embed']['kernel']
  # MoCo v3's bound: xavier-uniform of the [patch^2 * channels, hidden] matrix.
  bound = np.sqrt(6 / (8 * 8 * 3 + 32))
  assert 0.95 * bound < np.abs(kernel).max() <= bound
  np.testing.assert_array_equal(variables['frozen']['patch_embed']['bias'], 0)

  x = images(2)
  def loss(params, frozen):
    return loss_of(encoder.apply({'params': params, 'frozen': frozen}, x, train=False))
  grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables['params'], variables['frozen'])
  assert 'patch_embed' not in grads[0]
  assert count(grads[0]) == count(variables['params'])
  assert all(not np.any(g) for g in jax.tree.leaves(grads[1]))    # stop_gradient
  # ... but the projection is used: other frozen weights give other features.
  other = {'patch_embed': {'kernel': -kernel, 'bias': variables['frozen']['patch_embed']['bias']}}
  assert not np.allclose(apply(encoder, variables, x),
                         apply(encoder, {'params': variables['params'], 'frozen': other}, x))


def test_sincos_position_embedding_is_a_translation_invariant_constant():
  learned, sincos = tiny_variables('token')['params'], tiny_variables('sincos')['params']
  assert 'pos_embed' not in sincos
  assert count(learned) - count(sincos) == (1 + 16) * 32
  table = tiny(position_embedding='sincos').position_table((4, 5))
  assert table.shape == (1 + 20, 32)
  np.testing.assert_array_equal(table[0], 0)                 # the class token's
  patches = table[1:].reshape(4, 5, 32)
  # Sin-cos: two patches' dot product depends only on their offset, and no two
  # patches share an embedding.
  gram = np.einsum('abd,ced->acbe', patches, patches)        # [row, row', col, col']
  for dr in range(-3, 4):
    for dc in range(-4, 5):
      pairs = [gram[r, r + dr, c, c + dc] for r in range(4) for c in range(5)
               if 0 <= r + dr < 4 and 0 <= c + dc < 5]
      np.testing.assert_allclose(pairs, pairs[0], atol=1e-5)
  assert len({tuple(row) for row in np.round(table[1:], 5)}) == 20


def test_drop_path_is_per_sample_and_only_in_training():
  variables = tiny_variables()
  x = images(2)
  plain = apply(tiny(), variables, x)
  dropping = tiny(drop_path_rate=0.5)
  # Rate 0, or eval mode: the identity, and no rng needed.
  np.testing.assert_array_equal(apply(tiny(), variables, x, train=True), plain)
  np.testing.assert_array_equal(apply(dropping, variables, x), plain)
  with pytest.raises(flax.errors.InvalidRngError):
    apply(dropping, variables, x, train=True)
  # One keep/drop draw per sample and branch: 16 copies of one image come out as
  # a few distinct features (block 1's two branches kept or not), not 16.
  same = np.repeat(x[:1], 16, axis=0)
  out = apply(dropping, variables, same, train=True, rngs={'dropout': jax.random.key(1)})
  assert 1 < len({tuple(row) for row in np.round(out, 4)}) <= 4
  # The rate rises from 0 at the first block to the full rate at the last: at
  # rate 1 the second block is always dropped, the first never.
  first_only = {'params': {k: v for k, v in variables['params'].items() if k != 'block1'}}
  tolerances.assert_close(
      apply(tiny(drop_path_rate=1.0), variables, x, train=True,
            rngs={'dropout': jax.random.key(2)}),
      apply(vit.build_vit('vit_tiny', **{**TINY, 'depth': 1}), first_only, x))


def test_remat_gives_the_same_outputs_and_gradients():
  x = images(2)
  def outputs_and_grads(encoder):
    variables = init(encoder, x)
    def loss(params):
      features = encoder.apply({'params': params}, x, train=True,
                               rngs={'dropout': jax.random.key(3)})
      return loss_of(features), features
    return jax.jit(jax.grad(loss, has_aux=True))(variables['params'])
  grads, features = outputs_and_grads(tiny(drop_path_rate=0.5))
  remat_grads, remat_features = outputs_and_grads(tiny(drop_path_rate=0.5, remat=True))
  assert jax.tree.structure(remat_grads) == jax.tree.structure(grads)
  tolerances.assert_close(remat_features, features)
  tolerances.assert_trees_close(remat_grads, grads)


def test_bfloat16_compute_keeps_float32_params_and_features():
  variables = tiny_variables()
  x = images(2)
  encoder = tiny(dtype=jnp.bfloat16)
  assert {leaf.dtype for leaf in jax.tree.leaves(init(encoder, x[:1]))} == {jnp.dtype(jnp.float32)}
  full = apply(tiny(), variables, x)
  half = apply(encoder, variables, x)
  assert half.dtype == np.float32
  assert not np.array_equal(half, full)                       # bfloat16 was used
  # bfloat16 keeps 8 significant bits (0.4% per rounding): through two blocks the
  # features move by about 1% of their scale. 4% allows for that, and is still
  # far below what a wrong computation gives.
  tolerances.assert_close(half, full, rtol=0.0, scale=4 * tolerances.BFLOAT16_SCALE)


def test_image_size_is_any_multiple_of_the_patch_size():
  for fields in ({}, dict(pooling='gap', position_embedding='sincos')):
    encoder = tiny(**fields)
    x = images(2, 32, 48)
    variables = init(encoder, x)
    assert apply(encoder, variables, x).shape == (2, 32)
    if 'pos_embed' in variables['params']:
      tokens = 4 * 6 + (encoder.pooling == 'token')
      assert variables['params']['pos_embed'].shape == (1, tokens, 32)
  with pytest.raises(ValueError, match='not a multiple of patch_size'):
    tiny().init(jax.random.key(0), images(1, 30, 32), train=False)

"""The ResNet's normalisation choices and its named feature maps.

GroupNorm, LayerNorm and no normalisation keep no batch statistics and treat each
image on its own; GroupNorm and LayerNorm compute what torch's do; feature maps
have the shapes of their stages and cost nothing when none is asked for; and the
default network is, variable for variable and equation for equation, the one
before these choices existed.
"""

import importlib.util
import pathlib
import subprocess

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from contrastive import parallel
from contrastive.models import resnet
from tests import tolerances

# The last version of contrastive/models/resnet.py before ``norm`` and
# ``feature_maps``: the default network must keep its variables and program.
_BEFORE = '12cf52180f6ae92a86caa4672b31022cd3e0c008'
_IMAGES = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))


def _resnet(module=resnet, **fields):
  fields = {'stage_sizes': (1, 1, 1, 1), 'block': module.BasicBlock, 'width': 0.125,
            'stem': 'cifar', **fields}
  return module.ResNet(**fields)


def _init(model):
  return jax.jit(lambda key, x: model.init(key, x, train=False))(jax.random.key(0),
                                                                  _IMAGES[:2])


def _module_before():
  """resnet.py as it was at ``_BEFORE``, imported under another name."""
  root = pathlib.Path(__file__).resolve().parents[1]
  try:
    source = subprocess.run(['git', 'show', f'{_BEFORE}:contrastive/models/resnet.py'],
                            cwd=root, capture_output=True, text=True, check=True).stdout
  except (OSError, subprocess.CalledProcessError) as e:
    pytest.skip(f'needs the git history with {_BEFORE[:7]}: {e}')
  spec = importlib.util.spec_from_loader('resnet_before', loader=None)
  module = importlib.util.module_from_spec(spec)
  exec(compile(source, f'resnet.py@{_BEFORE[:7]}', 'exec'), module.__dict__)  # pylint: disable=exec-used
  return module


@pytest.mark.parametrize('norm', resnet.NORMS)
def test_only_batch_norm_shares_statistics_between_images(norm):
  """Training mode: an image's features move with the rest of its batch under
  BatchNorm only. The others keep no ``batch_stats`` and use no mesh axis: named
  one, they run with no mesh at all."""
  model = _resnet(norm=norm, group_norm_groups=4,
                  bn_axis_name=None if norm == 'batch' else parallel.AXIS)
  variables = _init(model)
  params = variables['params']
  stem = {'batch': 'stem_bn', 'group': 'stem_gn', 'layer': 'stem_ln', 'none': None}[norm]
  if norm == 'batch':
    assert set(variables) == {'params', 'batch_stats'}
    forward = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats'])[0])
  else:
    assert set(variables) == {'params'}
    forward = jax.jit(lambda v, x: model.apply(v, x, train=True))
  block = params['stage1_block1']
  if norm == 'none':
    assert set(params) == {'stem_conv'} | {f'stage{s}_block1' for s in range(1, 5)}
    assert set(block) == {'Conv_0', 'Conv_1'}
    assert set(params['stem_conv']) == {'kernel', 'bias'}
  else:
    kind = {'batch': 'BatchNorm', 'group': 'GroupNorm', 'layer': 'LayerNorm'}[norm]
    assert stem in params and set(params['stem_conv']) == {'kernel'}
    assert set(block) == {'Conv_0', 'Conv_1', f'{kind}_0', f'{kind}_1'}
    # Each residual block's last scale starts at zero, the others at one.
    assert not np.any(block[f'{kind}_1']['scale'])
    assert np.all(block[f'{kind}_0']['scale'] == 1)
  # Every scale at one, so that the blocks' last normalisations take part too.
  variables = {**variables, 'params': jax.tree_util.tree_map_with_path(
      lambda path, p: jnp.ones_like(p) if path[-1].key == 'scale' else p, params)}
  others = jax.random.normal(jax.random.key(2), _IMAGES.shape).at[0].set(_IMAGES[0])
  first, second = forward(variables, _IMAGES), forward(variables, others)
  if norm == 'batch':
    assert np.max(np.abs(second[0] - first[0])) > 1e-2 * np.max(np.abs(first[0]))
  else:
    tolerances.assert_close(second[0], first[0])
    assert np.max(np.abs(second[1:] - first[1:])) > 1e-2 * np.max(np.abs(first[1:]))


@pytest.mark.parametrize('kind', ['group', 'layer'])
def test_group_and_layer_norm_compute_what_torch_and_flax_do(kind):
  """Against torch in float64 (NCHW for GroupNorm; LayerNorm of the last axis of
  NHWC is over the channels at each position) on the same input and parameters,
  and against Flax's module (outputs and gradients, float32 and bfloat16). The
  backward pass keeps the input only, of the tensors of its size."""
  # Images of spreads 3 down to 0.003: the last one's variance (9e-6) is about
  # epsilon (1e-5), so another epsilon (Flax's default 1e-6, or 1e-3) moves its
  # outputs by over a quarter of their scale.
  spread = jnp.array([1.0, 1e-1, 1e-2, 1e-3])[:, None, None, None]
  x = (3 * jax.random.normal(jax.random.key(0), (4, 5, 5, 12)) + 1) * spread
  if kind == 'group':
    ours, flax_norm = resnet.GroupNorm(num_groups=3), nn.GroupNorm(num_groups=3, epsilon=1e-5)
    reference = torch.nn.GroupNorm(3, 12, eps=1e-5)
  else:
    ours, flax_norm = resnet.LayerNorm(), nn.LayerNorm(epsilon=1e-5)
    reference = torch.nn.LayerNorm(12, eps=1e-5)
  params = {'scale': jax.random.normal(jax.random.key(2), (12,)),
            'bias': jax.random.normal(jax.random.key(3), (12,))}
  assert (jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x))
          == jax.tree.map(jnp.shape, flax_norm.init(jax.random.key(1), x))
          == {'params': jax.tree.map(jnp.shape, params)})
  y = jax.jit(ours.apply)({'params': params}, x)

  reference = reference.double()
  with torch.no_grad():
    reference.weight.copy_(torch.from_numpy(np.asarray(params['scale'], np.float64)))
    reference.bias.copy_(torch.from_numpy(np.asarray(params['bias'], np.float64)))
    x64 = torch.from_numpy(np.asarray(x, np.float64))
    if kind == 'group':
      want = reference(x64.permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    else:
      want = reference(x64).numpy()
  # float32 against exact: each image's statistics round at ~1e-7 of its own
  # scale (its mean a third of its spread: no cancellation in E[x^2] - E[x]^2),
  # and the outputs, of order 1 in every image, at ~1e-7 of theirs; 1e-4 of the
  # output's largest magnitude leaves a margin of 1000 on any machine, and a
  # wrong axis, group or epsilon misses by percent.
  tolerances.assert_close(y, want)

  weights = jax.random.normal(jax.random.key(4), x.shape)

  def results(module, dtype):
    def loss(params, x):
      y = module.clone(dtype=dtype).apply({'params': params}, x.astype(dtype))
      return jnp.sum(y.astype(jnp.float32) * weights), y
    (_, y), grads = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(params, x)
    return y, grads

  for dtype, scale in (('float32', tolerances.SCALE), ('bfloat16', tolerances.BFLOAT16_SCALE)):
    got, want = results(ours, dtype), results(flax_norm, dtype)
    assert got[0].dtype == want[0].dtype == jnp.dtype(dtype)
    # bfloat16 outputs round the same float32 values; a differently fused sum moves
    # one by a unit of bfloat16's last place.
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      tolerances.assert_close(np.asarray(g, np.float32), np.asarray(w, np.float32), scale=scale)
    x16 = x.astype(dtype)
    residuals = jax.eval_shape(
        lambda x: jax.vjp(lambda x: ours.clone(dtype=dtype).apply({'params': params}, x),
                          x)[1], x16)
    kept = [leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(residuals)
            if leaf.size >= x.size]
    assert kept == [x16.nbytes], kept


@pytest.mark.parametrize('stem,sizes', [
    ('cifar', (16, 16, 8, 4, 2)),
    ('imagenet', (4, 4, 2, 1, 1)),
])
def test_feature_maps_have_their_stages_shapes(stem, sizes):
  """Every name, then one: float32 ``[B, H, W, C]`` beside the pooled features,
  which are the mean of 'stage4' over its positions and what the network without
  feature maps returns. bfloat16 compute still returns float32 maps."""
  model = _resnet(stem=stem, feature_maps=resnet.FEATURE_MAPS)
  variables = _init(model)
  channels = (8, 8, 16, 32, 64)
  pooled, maps = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, _IMAGES)
  assert set(maps) == set(resnet.FEATURE_MAPS)
  for name, size, c in zip(resnet.FEATURE_MAPS, sizes, channels):
    assert maps[name].shape == (4, size, size, c) and maps[name].dtype == jnp.float32
  tolerances.assert_close(pooled, np.mean(np.asarray(maps['stage4'], np.float64), axis=(1, 2)))
  plain = model.clone(feature_maps=())
  tolerances.assert_close(
      jax.jit(lambda v, x: plain.apply(v, x, train=False))(variables, _IMAGES), pooled)

  one = model.clone(feature_maps=('stage2',), dtype=jnp.bfloat16, norm='group',
                    group_norm_groups=8)
  shapes = jax.eval_shape(lambda x: one.init_with_output(jax.random.key(0), x, train=True),
                          _IMAGES)[0]
  assert jax.tree.map(lambda s: (s.shape, s.dtype), shapes) == (
      ((4, 64), jnp.float32), {'stage2': ((4, sizes[2], sizes[2], 16), jnp.float32)})


def test_default_network_is_the_one_before():
  """Same variable names and values at a fixed seed as resnet.py before ``norm``
  and ``feature_maps`` (so checkpoints and exports load as they did), and the
  same traced program, in training and evaluation, for each stem and block (in
  bfloat16 too, where a needless cast would show)."""
  before = _module_before()
  model_before, model = _resnet(before), _resnet()
  variables = _init(model)
  variables_before = _init(model_before)
  assert jax.tree.structure(variables) == jax.tree.structure(variables_before)
  jax.tree.map(np.testing.assert_array_equal, variables, variables_before)

  x = jnp.zeros((2, 16, 16, 3))
  for stem in resnet.STEMS:
    for block, dtype in (('BasicBlock', jnp.float32), ('Bottleneck', jnp.bfloat16)):
      fields = dict(stem=stem, bn_axis_name=parallel.AXIS, remat_stages=(2,), dtype=dtype)
      old = _resnet(before, block=getattr(before, block), **fields)
      news = [_resnet(block=getattr(resnet, block), **fields),
              _resnet(block=getattr(resnet, block), norm='batch', feature_maps=(), **fields)]
      shapes = jax.eval_shape(lambda x, m=old: m.init(jax.random.key(0), x, train=False), x)
      for train in (False, True):
        def program(m, train=train):
          mutable = ['batch_stats'] if train else False
          return str(jax.make_jaxpr(
              lambda v, x: m.apply(v, x, train=train, mutable=mutable),
              axis_env=[(parallel.AXIS, 8)])(shapes, x))
        want = program(old)
        for new in news:
          assert program(new) == want, (stem, block, train)


def test_unknown_names_and_bad_group_counts_are_named():
  x = jnp.zeros((2, 16, 16, 3))

  def init(**fields):
    return jax.eval_shape(lambda: _resnet(**fields).init(jax.random.key(0), x, train=False))

  with pytest.raises(ValueError, match=r"feature_maps: unknown 'stage5'; valid: "
                                       r'stem, stage1, stage2, stage3, stage4\b'):
    init(feature_maps=('stage1', 'stage5'))
  with pytest.raises(ValueError, match=r"model.norm='instance'; valid: batch, group, layer, none"):
    init(norm='instance')
  # Width 0.125: the stem has 8 channels, and every layer a multiple of them.
  with pytest.raises(ValueError, match=r'model\.group_norm_groups=32 does not divide the 8 '
                                       r'channels .* use a divisor of 8: 1, 2, 4, 8\b'):
    init(norm='group')
  with pytest.raises(ValueError, match=r'model\.group_norm_groups=0 '):
    init(norm='group', group_norm_groups=0)
  init(norm='group', group_norm_groups=8)     # divides 8, 16, 32 and 64

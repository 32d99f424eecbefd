"""AMDIM (Bachman et al. 2019): the global feature of one view against the local
features of the other; DIM (Hjelm et al. 2019) as its one-view special case.

The network (:mod:`contrastive.models.global_local`) is a ResNet of
``config.model`` with two feature-map taps, ``amdim.local_maps`` (the finer
first: AMDIM's 7 x 7, then the coarser: its 5 x 5), and a residual 1 x 1 MLP
embedding the pooled feature and every map position in ``amdim.embed_dim``
(AMDIM's ``n_rkhs``). AMDIM's own encoder (no padding, sized to give exactly
7 x 7 and 5 x 5) is not built here: the maps are the ResNet's stages, 8 x 8 and
4 x 4 for a CIFAR ResNet at 32 px or a ResNet-50 at 128 px.

``amdim.terms`` are AMDIM's three predictions, each from one view to the other
and back, averaged over the two directions: ``'global_fine'`` (1 -> 7),
``'global_coarse'`` (1 -> 5) and ``'coarse_coarse'`` (5 -> 5, the source one
position of the coarse map drawn per image, keyed by its place in the global
batch). Each is :func:`contrastive.losses.global_local_nce`: scores divided by
sqrt(``embed_dim``), ``amdim.score_penalty`` x their mean square added to the
loss, then clipped by ``amdim.score_clip * tanh(s / score_clip)``; the negatives
are every location of every other image of the global batch. Logged:
``nce_<term>`` and ``regulariser``. With ``amdim.two_views=False`` one view is
its own target: DIM's local objective (global against every local position) in
its InfoNCE form, with the terms ``('global_fine',)``.

Evaluation and export use the ResNet's pooled features.
"""

import jax
import jax.numpy as jnp
import ml_collections

from contrastive import losses
from contrastive import models
from contrastive.methods.contract import (Batch, Context, LossOutput, Method, View, forward,
                                          replica_key)
from contrastive.models import global_local
from contrastive.models import resnet

TERMS = ('global_fine', 'global_coarse', 'coarse_coarse')
# Each term's (source, target) among the network's (global, fine, coarse) outputs.
_SOURCE_TARGET = {'global_fine': (0, 1), 'global_coarse': (0, 2), 'coarse_coarse': (2, 2)}


def default_config() -> ml_collections.ConfigDict:
  section = ml_collections.ConfigDict()
  section.embed_dim = 1024             # AMDIM's n_rkhs (CIFAR-10 release default)
  section.score_clip = 20.0            # tclip: scores -> clip * tanh(s / clip)
  section.score_penalty = 0.05         # x mean(score^2), on the raw scores
  section.local_maps = ('stage3', 'stage4')   # the fine (AMDIM's 7x7), then the coarse (5x5)
  section.terms = TERMS
  section.two_views = True             # False: DIM, a view against its own local features
  return section


def build_model(config):
  amdim = config.amdim
  encoder = models.build_encoder(config.model, feature_maps=tuple(amdim.local_maps))
  return global_local.GlobalLocalNetwork(
      encoder=encoder, local_maps=tuple(amdim.local_maps), embed_dim=amdim.embed_dim,
      bn_axis_name=models.bn_axis_name(config.model, 'data'),
      bn_momentum=config.model.bn_momentum, dtype=encoder.dtype)


def views(config):
  view = View(config.aug, config.data.image_size, 'aug')
  return (view, view) if config.amdim.two_views else (view,)


def check_config(config) -> list[str]:
  amdim, problems = config.amdim, []
  if not (isinstance(amdim.embed_dim, int) and amdim.embed_dim >= 1):
    problems.append(f'config.amdim.embed_dim={amdim.embed_dim!r} must be an integer >= 1.')
  if not amdim.score_clip > 0:
    problems.append(f'config.amdim.score_clip={amdim.score_clip} must be > 0.')
  if not amdim.score_penalty >= 0:
    problems.append(f'config.amdim.score_penalty={amdim.score_penalty} must be >= 0.')
  maps = tuple(amdim.local_maps)
  if len(maps) != 2 or len(set(maps)) != 2 or not set(maps) <= set(resnet.FEATURE_MAPS):
    problems.append(f'config.amdim.local_maps={maps!r}; must be two distinct ResNet '
                    f'stages, the finer first, of {", ".join(resnet.FEATURE_MAPS)}')
  if config.model.name not in resnet.ARCHITECTURES:
    problems.append(f'config.model.name={config.model.name!r}: AMDIM taps feature maps '
                    f'of a ResNet ({", ".join(resnet.ARCHITECTURES)}).')
  terms = tuple(amdim.terms)
  if not terms or len(set(terms)) != len(terms) or not set(terms) <= set(TERMS):
    problems.append(f'config.amdim.terms={terms!r}; must be distinct values of '
                    f'{", ".join(TERMS)}')
  elif not amdim.two_views and 'coarse_coarse' in terms:
    problems.append("config.amdim.terms holds 'coarse_coarse' with "
                    'config.amdim.two_views=False: one position of a map against the '
                    'same map finds itself; drop it (DIM: terms=("global_fine",)).')
  return problems


def _one_position(maps, key, axis_name):
  """One position of each image's map ``[b, L, D]``, drawn by its place in the
  global batch: ``[b, D]``."""
  b, locations = maps.shape[:2]
  first = 0 if axis_name is None else jax.lax.axis_index(axis_name) * b
  keys = jax.vmap(jax.random.fold_in, (None, 0))(key, first + jnp.arange(b))
  drawn = jax.vmap(lambda k: jax.random.randint(k, (), 0, locations))(keys)
  return maps[jnp.arange(b), drawn]


def loss(ctx: Context, params, model_state, method_state, batch: Batch, key) -> LossOutput:
  del method_state
  amdim, axis_name = ctx.config.amdim, ctx.axis_name
  n = batch.views[0].shape[0]
  images = jnp.concatenate(batch.views)              # both views in one batch: BN sees both
  (features, embedded), model_state = forward(
      ctx.model, {'params': params, **model_state}, images, replica_key(key, axis_name))
  flat = [e if e.ndim == 2 else e.reshape(e.shape[0], -1, e.shape[-1]) for e in embedded]
  per_view = [[e[v * n:(v + 1) * n] for e in flat] for v in range(len(batch.views))]
  pairs = [(0, 1), (1, 0)] if amdim.two_views else [(0, 0)]
  nce, regulariser = {}, 0.0
  for term in amdim.terms:
    source_index, target_index = _SOURCE_TARGET[term]
    values = []
    for source_view, target_view in pairs:
      source = per_view[source_view][source_index]
      if source.ndim == 3:                           # a map: one position per image
        source = _one_position(source, jax.random.fold_in(key, source_view), axis_name)
      value, penalty = losses.global_local_nce(
          source, per_view[target_view][target_index], amdim.score_clip,
          amdim.score_penalty, axis_name)
      values.append(value)
      regulariser += penalty / len(pairs)
    nce[term] = sum(values) / len(pairs)
  return LossOutput(loss=sum(nce.values()) + regulariser, model_state=model_state,
                    features=features[:n],
                    metrics={**{f'nce_{t}': v for t, v in nce.items()},
                             'regulariser': regulariser})


METHOD = Method(name='amdim', loss=loss, default_config=default_config,
                build_model=build_model, views=views, check_config=check_config)

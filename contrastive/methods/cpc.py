"""CPC v2 (Henaff et al. 2020): predict the patches below from a context of those above.

Each image is one view (``config.aug``: its crop and flip at ``data.image_size``)
cut into a grid of ``cpc.patch_size`` patches every ``cpc.patch_stride`` pixels
(ImageNet: 64 px every 32 px of a 256 px crop, a 7 x 7 grid), each patch
augmented on its own with ``cpc.patch_aug`` (colour dropping, flip, a crop
within the patch), all on the device and keyed by the image's position in the
global batch (:class:`contrastive.methods.PatchGrid`). The encoder (``config.model``,
a ResNet with ``model.norm='layer'`` in CPC v2: BatchNorm's batch statistics
would let patches see each other) embeds every patch; there is no projection
head. Per direction in ``cpc.directions`` a masked context network sees, at
grid row ``r``, only rows ``<= r`` along that direction, and a linear map per
offset ``k`` in ``cpc.offsets`` predicts the target (a linear map of the
latent) ``k`` rows further on (:mod:`contrastive.models.patch_grid`).

The loss is InfoNCE: each prediction, scaled by ``cpc.prediction_scale``, is
scored against the targets of every patch of the global batch, its own target
the positive (:func:`contrastive.losses.predictive_cross_entropy`: a device
scores the gathered predictions against its own patches and the softmax is
combined across devices). The loss is the sum over directions and offsets of
each one's mean over its predictions; ``loss_<direction>`` are logged too.

Evaluation, exports and downstream tasks use the encoder on the grid of the
whole (centre-cropped) image, its patch features averaged
(:class:`contrastive.models.patch_grid.PatchGridEncoder`).
"""

import jax.numpy as jnp
import jax
import ml_collections
import numpy as np

from contrastive import losses
from contrastive import models
from contrastive.data import augment
from contrastive.data import augment_config
from contrastive.methods.contract import (PARAMS, Batch, Context, LossOutput, Method,
                                          PatchGrid, View, forward, replica_key)
from contrastive.models import patch_grid


def default_config() -> ml_collections.ConfigDict:
  section = ml_collections.ConfigDict()
  section.patch_size = 64              # CPC v2 on ImageNet: 64 px patches ...
  section.patch_stride = 32            # ... every 32 px (7 x 7 of a 256 px crop)
  section.patch_aug = augment_config.cpc_patch_augment_config()
  section.target_dim = 64              # the targets' and predictions' dimension
  section.context_channels = 256       # the context blocks' inner width
  section.context_blocks = 5
  section.directions = ('down', 'up')  # any of patch_grid.DIRECTIONS
  section.offsets = (3, 4, 5)          # rows ahead predicted (the 2 nearest overlap)
  section.prediction_scale = 0.1       # predictions x this before the dot products
  return section


def build_model(config):
  cpc = config.cpc
  encoder = models.build_encoder(config.model)
  return patch_grid.CPCNetwork(
      encoder=encoder, patch_size=cpc.patch_size, stride=cpc.patch_stride,
      target_dim=cpc.target_dim, context_channels=cpc.context_channels,
      context_blocks=cpc.context_blocks, directions=tuple(cpc.directions),
      offsets=tuple(cpc.offsets), dtype=encoder.dtype)


def backbone(config, axis_name=None):
  return patch_grid.PatchGridEncoder(
      models.with_bn_axis(models.build_encoder(config.model), axis_name),
      config.cpc.patch_size, config.cpc.patch_stride)


def backbone_variables(params, model_state) -> dict:
  """The patch encoder's variables, under ``encoder`` as the grid encoder holds it."""
  return {PARAMS: {'encoder': params['encoder']},
          **{name: {'encoder': tree['encoder']} for name, tree in model_state.items()
             if 'encoder' in tree}}


def views(config):
  cpc = config.cpc
  return (View(config.aug, config.data.image_size, 'aug',
               grid=PatchGrid(cpc.patch_size, cpc.patch_stride, cpc.patch_aug,
                              'cpc.patch_aug')),)


def check_config(config) -> list[str]:
  cpc, problems = config.cpc, []
  directions = tuple(cpc.directions)
  unknown = [d for d in directions if d not in patch_grid.DIRECTIONS]
  if not directions or unknown or len(set(directions)) != len(directions):
    problems.append(f'config.cpc.directions={directions!r}; must be distinct values of '
                    f'{", ".join(patch_grid.DIRECTIONS)}')
  for field in ('target_dim', 'context_channels'):
    if not (isinstance(cpc[field], int) and cpc[field] >= 1):
      problems.append(f'config.cpc.{field}={cpc[field]!r} must be an integer >= 1.')
  if not (isinstance(cpc.context_blocks, int) and cpc.context_blocks >= 0):
    problems.append(f'config.cpc.context_blocks={cpc.context_blocks!r} must be an '
                    'integer >= 0.')
  if not cpc.prediction_scale > 0:
    problems.append(f'config.cpc.prediction_scale={cpc.prediction_scale} must be > 0.')
  offsets = tuple(cpc.offsets)
  size, patch, stride = config.data.image_size, cpc.patch_size, cpc.patch_stride
  side = (augment.grid_side(size, patch, stride)
          if all(isinstance(v, int) and v >= 1 for v in (size, patch, stride)) else None)
  if (not offsets or len(set(offsets)) != len(offsets)
      or not all(isinstance(k, int) and k >= 1 for k in offsets)):
    problems.append(f'config.cpc.offsets={offsets!r}; must be distinct integers >= 1 '
                    '(how many rows ahead each prediction lies)')
  elif side is not None and side >= 2 and max(offsets) >= side:
    problems.append(f'config.cpc.offsets={offsets!r}: the grid has {side} rows '
                    f'(data.image_size={size}, cpc.patch_size={patch}, '
                    f'cpc.patch_stride={stride}); every offset must be < {side}')
  return problems


def prediction_rows(targets, predictions, offsets, scale: float):
  """Every prediction with its positive: the bookkeeping of CPC's loss.

  ``targets`` ``[b, G, G, T]`` in grid order, ``predictions`` as
  :class:`~contrastive.models.patch_grid.CPCNetwork` returns them. For each
  direction and offset ``k``, the prediction at turned position ``(r, c)``,
  ``r < G - k``, has as positive the target at turned ``(r + k, c)``: the grid
  patch :func:`~contrastive.models.patch_grid.orient` puts there.

  Returns ``(queries [m, T], positive_logits [m], weights [m], groups)``:
  ``weights`` average each (direction, offset) over its rows, and ``groups``
  names the direction of each row's slice, ``{direction: (start, stop)}``.
  """
  b, side = targets.shape[:2]
  by_patch = targets.reshape(b, side * side, -1)
  ids = np.arange(side * side).reshape(side, side)
  queries, positives, weights, groups = [], [], [], {}
  for direction, turned_predictions in predictions.items():
    start = sum(q.shape[0] for q in queries)
    turned_ids = patch_grid.orient(ids, direction)
    for j, k in enumerate(offsets):
      query = turned_predictions[:, :side - k, :, j].reshape(b, -1, targets.shape[-1])
      positive = by_patch[:, turned_ids[k:].reshape(-1)]             # [b, M, T]
      query = query * scale
      queries.append(query.reshape(-1, targets.shape[-1]))
      positives.append(jnp.sum(query * positive, axis=-1).reshape(-1))
      weights.append(jnp.full((query.shape[0] * query.shape[1],), 1.0 / query[..., 0].size))
    groups[direction] = (start, sum(q.shape[0] for q in queries))
  return (jnp.concatenate(queries), jnp.concatenate(positives), jnp.concatenate(weights),
          groups)


def loss(ctx: Context, params, model_state, method_state, batch: Batch, key) -> LossOutput:
  del method_state
  cpc, axis_name = ctx.config.cpc, ctx.axis_name
  (features, (targets, predictions)), model_state = forward(
      ctx.model, {'params': params, **model_state}, batch.views[0],
      replica_key(key, axis_name))
  queries, positive_logits, weights, groups = prediction_rows(
      targets, predictions, tuple(cpc.offsets), cpc.prediction_scale)
  candidates = targets.reshape(-1, targets.shape[-1])
  per_row = weights * losses.predictive_cross_entropy(queries, positive_logits,
                                                      candidates, axis_name)
  per_direction = {direction: jnp.sum(per_row[start:stop])
                   for direction, (start, stop) in groups.items()}
  if axis_name is not None:
    per_direction = jax.lax.pmean(per_direction, axis_name)
  return LossOutput(loss=sum(per_direction.values()), model_state=model_state,
                    features=features,
                    metrics={f'loss_{d}': value for d, value in per_direction.items()})


METHOD = Method(name='cpc', loss=loss, default_config=default_config,
                build_model=build_model, backbone=backbone,
                backbone_variables=backbone_variables, views=views,
                check_config=check_config)

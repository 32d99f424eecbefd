"""MoCo v3 (Chen, Xie and He 2021): in-batch keys from an EMA encoder.

The networks are BYOL's (:mod:`contrastive.methods.byol`): queries come from the
online encoder -> projector -> predictor, keys from an EMA copy of encoder and
projector, its momentum rising from ``config.moco_v3.momentum`` to 1 on a cosine.
There is no queue: each query's negatives are the keys of the other images of
the global batch (gathered across replicas), its positive the key of the other
view of its own image. The loss is that cross-entropy at temperature T, for
both views as queries, summed, times 2T (as in the paper). The views are
BYOL's asymmetric ones (``config.aug``, ``config.aug2``).

The encoder is any of :mod:`contrastive.models`': the paper's ResNet-50 recipe
(T = 1) or its Vision Transformers (T = 0.2, AdamW, the frozen random patch
projection: ``configs/moco_v3_vit_imagenet.py``).
"""

import ml_collections

from contrastive import config_checks
from contrastive import losses
from contrastive.methods import byol
from contrastive.methods import ema
from contrastive.methods.contract import Batch, Context, LossOutput, Method


def default_config() -> ml_collections.ConfigDict:
  section = ml_collections.ConfigDict()
  section.temperature = 1.0         # 1.0 for ResNets, 0.2 for ViTs; the loss is scaled by 2T
  section.momentum = 0.99           # key encoder EMA, rising to 1 (cosine)
  section.momentum_schedule = 'cosine'
  return section


def check_config(config) -> list[str]:
  section = config.moco_v3
  problems = ema.check(section, 'moco_v3') + config_checks.predictor_problems(config)
  if section.temperature <= 0:
    problems.append(f'config.moco_v3.temperature={section.temperature} must be > 0.')
  return problems


def loss(ctx: Context, params, model_state, method_state, batch: Batch, key) -> LossOutput:
  n = batch.views[0].shape[0]
  temperature = ctx.config.moco_v3.temperature
  features, queries, keys, online_state, target_state = byol.online_and_target(
      ctx, params, model_state, method_state['target'], batch.views, key)
  value = 2.0 * temperature * (
      losses.in_batch_info_nce(queries[:n], keys[n:], temperature, ctx.axis_name) +
      losses.in_batch_info_nce(queries[n:], keys[:n], temperature, ctx.axis_name))
  return LossOutput(loss=value, model_state=online_state, features=features[:n],
                    for_update={'target_model_state': target_state})


def update_state(ctx: Context, method_state, params, for_update, step):
  return byol.update_target(ctx, method_state, params, for_update, step, ctx.config.moco_v3)


METHOD = Method(name='moco_v3', loss=loss, default_config=default_config,
                build_model=byol.build_model, views=byol.views,
                check_config=check_config, init_state=byol.init_state,
                update_state=update_state)

"""Optimisers (LARS, SGD, AdamW) and the warmup + cosine or step learning-rate schedule."""

import math

import jax
import ml_collections
import optax

OPTIMIZERS = ('lars', 'sgd', 'adamw')
LR_SCALINGS = ('linear', 'sqrt', 'none')


def scaled_learning_rate(optim: ml_collections.ConfigDict, global_batch: int) -> float:
  """Peak learning rate from ``optim.base_lr`` and the global batch size.

  'linear': base_lr * B / 256 (SimCLR, MoCo); 'sqrt': base_lr * sqrt(B) (SimCLR's
  choice for small batches); 'none': base_lr as given.
  """
  if optim.lr_scaling == 'linear':
    return optim.base_lr * global_batch / 256
  if optim.lr_scaling == 'sqrt':
    return optim.base_lr * math.sqrt(global_batch)
  if optim.lr_scaling == 'none':
    return optim.base_lr
  raise ValueError(
      f'optim.lr_scaling={optim.lr_scaling!r}; valid: {", ".join(LR_SCALINGS)}')


SCHEDULES = ('cosine', 'steps')


def learning_rate_schedule(peak_lr: float, warmup_steps: int, total_steps: int,
                           decay: str = 'cosine', boundaries=(), factor: float = 0.1):
  """Linear warmup from 0 to ``peak_lr``, then a decay.

  'cosine': cosine decay to 0 at ``total_steps`` (SimCLR, MoCo v2). 'steps': the
  rate is multiplied by ``factor`` at each of ``boundaries`` (steps from the start
  of the run; MoCo v1 and the memory bank).
  """
  warmup_steps = min(warmup_steps, total_steps)
  if decay == 'cosine':
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak_lr, warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1), end_value=0.0)
  if decay == 'steps':
    if any(b < warmup_steps for b in boundaries):
      raise ValueError(f'optim.decay_epochs fall inside the warmup ({warmup_steps} steps): '
                       f'{sorted(boundaries)} steps.')
    steps = optax.piecewise_constant_schedule(
        peak_lr, {b - warmup_steps: factor for b in sorted(boundaries)})
    if not warmup_steps:
      return steps
    warmup = optax.linear_schedule(0.0, peak_lr, warmup_steps)
    return optax.join_schedules([warmup, steps], [warmup_steps])
  raise ValueError(f'optim.schedule={decay!r}; valid: {", ".join(SCHEDULES)}')


def schedule_from_config(optim: ml_collections.ConfigDict, peak_lr: float,
                         steps_per_epoch: float, total_steps: int):
  """The schedule an ``optim`` config describes, its epochs turned into steps."""
  return learning_rate_schedule(
      peak_lr, int(round(optim.warmup_epochs * steps_per_epoch)), total_steps,
      optim.schedule, [int(round(epoch * steps_per_epoch)) for epoch in optim.decay_epochs],
      optim.decay_factor)


# Parameters that are no weights, by their name: biases, normalisation scales (and
# their biases), a ViT's position embedding and class token.
NOT_WEIGHTS = ('bias', 'scale', 'pos_embed', 'cls_token')


def decay_mask(params):
  """True for weights (kernels, classifier rows); False, by role, for the
  parameters named in :data:`NOT_WEIGHTS`, whatever their rank (a ViT's position
  embedding is 3-D). Used for both weight decay and LARS's trust ratio, as in
  SimCLR, BYOL and MoCo v3."""
  def is_weight(path, _):
    last = path[-1] if path else None
    return getattr(last, 'key', getattr(last, 'name', None)) not in NOT_WEIGHTS
  return jax.tree_util.tree_map_with_path(is_weight, params)


def make_optimizer(optim: ml_collections.ConfigDict, schedule) -> optax.GradientTransformation:
  if optim.name == 'lars':
    return optax.lars(
        learning_rate=schedule, weight_decay=optim.weight_decay,
        weight_decay_mask=decay_mask, trust_coefficient=optim.trust_coefficient,
        trust_ratio_mask=decay_mask, momentum=optim.momentum)
  if optim.name == 'sgd':
    return optax.chain(
        optax.add_decayed_weights(optim.weight_decay, mask=decay_mask),
        optax.sgd(schedule, momentum=optim.momentum, nesterov=optim.nesterov))
  if optim.name == 'adamw':
    b1, b2 = optim.get('adam_betas', (0.9, 0.999))
    return optax.adamw(schedule, b1=b1, b2=b2, weight_decay=optim.weight_decay,
                       mask=decay_mask)
  raise ValueError(f'optim.name={optim.name!r}; valid: {", ".join(OPTIMIZERS)}')

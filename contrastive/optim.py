"""Optimisers (LARS, SGD, AdamW) and the warmup + cosine learning-rate schedule."""

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


def learning_rate_schedule(peak_lr: float, warmup_steps: int, total_steps: int):
  """Linear warmup from 0 to ``peak_lr``, then cosine decay to 0."""
  warmup_steps = min(warmup_steps, total_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak_lr, warmup_steps=warmup_steps,
      decay_steps=max(total_steps, warmup_steps + 1), end_value=0.0)


def decay_mask(params):
  """True for kernels; False for biases and BatchNorm parameters (all 1-D).

  Used for both weight decay and LARS's trust ratio, as in SimCLR.
  """
  return jax.tree.map(lambda p: p.ndim > 1, params)


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
    return optax.adamw(schedule, weight_decay=optim.weight_decay, mask=decay_mask)
  raise ValueError(f'optim.name={optim.name!r}; valid: {", ".join(OPTIMIZERS)}')

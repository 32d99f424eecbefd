"""An EMA target network: a slowly moving copy of the online network.

MoCo's key encoder, BYOL's target and SimCLR v2's momentum encoder are all this:
Flax variables ``{'params', **model_state}`` of the same network, whose parameters
follow the online parameters as ``m * target + (1 - m) * online`` after every
optimizer step and never receive gradients, and whose model state (BatchNorm
statistics) is the one its own forward passes compute. The momentum is constant
or rises to 1 on BYOL's cosine schedule.
"""

import jax
import jax.numpy as jnp

from contrastive.methods import contract

MOMENTUM_SCHEDULES = ('constant', 'cosine')


def init(variables, without=()) -> dict:
  """The target starts as a copy of the freshly initialised online network, less
  the parts named in ``without`` that only the online side has (a predictor)."""
  return {collection: {name: value for name, value in tree.items() if name not in without}
          for collection, tree in variables.items()}


def momentum_at(step, momentum: float, schedule: str, total_steps: int):
  """The EMA momentum at ``step``: constant, or BYOL's cosine from ``momentum`` to 1."""
  if schedule == 'constant':
    return jnp.asarray(momentum, jnp.float32)
  progress = jnp.minimum(step / max(total_steps, 1), 1.0)
  return 1.0 - (1.0 - momentum) * (jnp.cos(jnp.pi * progress) + 1.0) / 2.0


def ema(target, online, momentum):
  return jax.tree.map(lambda t, o: momentum * t + (1.0 - momentum) * o, target, online)


def forward(model, target: dict, images, method=None):
  """The target network on ``images`` in training mode, without gradients.

  Returns ``(outputs, model_state)``: the statistics the model's BatchNorm
  computed (over the axis it synchronises on, if any), for :func:`update`.
  """
  outputs, model_state = contract.forward(model, target, images, method=method)
  return jax.lax.stop_gradient(outputs), model_state


def update(target: dict, online_params, model_state, momentum) -> dict:
  """After the optimizer step: parameters EMA-updated, model state replaced. Only
  the online parameters the target has are followed."""
  online = {name: online_params[name] for name in target['params']}
  return {'params': ema(target['params'], online, momentum), **model_state}


def check(section, field: str) -> list[str]:
  """Problems with a section's ``momentum`` and ``momentum_schedule`` fields."""
  problems = []
  if not 0.0 <= section.momentum <= 1.0:
    problems.append(f'config.{field}.momentum={section.momentum} must lie in [0, 1].')
  if section.momentum_schedule not in MOMENTUM_SCHEDULES:
    problems.append(f'config.{field}.momentum_schedule={section.momentum_schedule!r}; '
                    f'valid: {", ".join(MOMENTUM_SCHEDULES)}')
  return problems

"""Online linear probe: a classifier trained during pretraining on the features the
train step already computes, so the accuracy curve costs no extra forward pass.

The features are taken under ``stop_gradient`` and the probe has its own
parameters and optimizer, so it never changes what the encoder learns.
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


class OnlineProbe(NamedTuple):
  classifier: nn.Dense
  tx: optax.GradientTransformation


def create(num_classes: int, learning_rate: float) -> OnlineProbe:
  return OnlineProbe(nn.Dense(num_classes), optax.adam(learning_rate))


def init(probe: OnlineProbe, key, num_features: int) -> dict:
  params = probe.classifier.init(key, jnp.zeros((1, num_features)))['params']
  return {'params': params, 'opt_state': probe.tx.init(params)}


def update(probe: OnlineProbe, state: dict, features, labels, axis_name: str | None):
  """One optimizer step on this replica's labelled rows (label -1: unlabelled).

  The loss is the mean over the labelled rows of the global batch, the same on
  every replica, so its gradient is the global gradient.
  """
  features = jax.lax.stop_gradient(features.astype(jnp.float32))
  labelled = labels >= 0
  psum = (lambda x: x) if axis_name is None else (lambda x: jax.lax.psum(x, axis_name))
  count = jnp.maximum(psum(jnp.sum(labelled)), 1)

  def loss_fn(params):
    logits = probe.classifier.apply({'params': params}, features)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
    return psum(jnp.sum(jnp.where(labelled, losses, 0.0))) / count, logits

  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
  updates, opt_state = probe.tx.update(grads, state['opt_state'], state['params'])
  correct = psum(jnp.sum(labelled & (jnp.argmax(logits, -1) == labels)))
  new_state = {'params': optax.apply_updates(state['params'], updates),
               'opt_state': opt_state}
  return new_state, {'online_probe_loss': loss, 'online_probe_train_accuracy': correct / count}


def accuracy(probe: OnlineProbe, params, features, labels) -> float:
  """Top-1 of the probe on (host) features, e.g. of the evaluation split."""
  logits = probe.classifier.apply({'params': params}, jnp.asarray(features, jnp.float32))
  return float(jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(labels)))

"""Linear probe: softmax regression on frozen, standardised features."""

import jax
import jax.numpy as jnp
import numpy as np
import optax


def train_linear_probe(features, labels, num_classes: int, epochs: int = 100,
                       batch_size: int = 256, learning_rate: float = 1e-2,
                       weight_decay: float = 1e-4, seed: int = 0):
  """Fits a linear classifier with AdamW and a cosine schedule.

  Features are standardised with the training statistics (returned with the
  weights), which makes one learning rate work for any encoder.
  """
  features = np.asarray(features, np.float32)
  labels = np.asarray(labels, np.int32)
  mean, std = features.mean(0), features.std(0) + 1e-6
  x_all = (features - mean) / std
  n, dim = x_all.shape
  batch_size = min(batch_size, n)
  steps_per_epoch = n // batch_size
  schedule = optax.cosine_decay_schedule(learning_rate, epochs * steps_per_epoch)
  tx = optax.adamw(schedule, weight_decay=weight_decay)
  params = {'w': jnp.zeros((dim, num_classes)), 'b': jnp.zeros((num_classes,))}
  opt_state = tx.init(params)

  def loss_fn(params, x, y):
    logits = x @ params['w'] + params['b']
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def epoch(params, opt_state, order, x_all, labels):
    def step(carry, index):
      params, opt_state = carry
      grads = jax.grad(loss_fn)(params, x_all[index], labels[index])
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), None
    batches = order[:steps_per_epoch * batch_size].reshape(steps_per_epoch, batch_size)
    (params, opt_state), _ = jax.lax.scan(step, (params, opt_state), batches)
    return params, opt_state

  rng = np.random.default_rng(seed)
  for _ in range(epochs):
    params, opt_state = epoch(params, opt_state, rng.permutation(n), x_all, labels)
  return {'w': params['w'], 'b': params['b'], 'mean': mean, 'std': std}


def probe_accuracy(probe, features, labels) -> float:
  x = (np.asarray(features, np.float32) - probe['mean']) / probe['std']
  predictions = np.argmax(np.asarray(x @ probe['w'] + probe['b']), axis=-1)
  return float(np.mean(predictions == np.asarray(labels)))

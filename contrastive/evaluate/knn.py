"""Weighted cosine kNN classifier (Wu et al. 2018), the standard SSL monitor."""

import jax
import jax.numpy as jnp
import numpy as np


def _normalize(x):
  x = jnp.asarray(x, jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def knn_predict(train_features, train_labels, query_features, num_classes: int,
                k: int = 200, temperature: float = 0.1, chunk: int = 1024):
  """Class scores ``[Q, C]``: the k most cosine-similar training features vote
  for their labels with weight exp(similarity / temperature)."""
  bank = _normalize(train_features)
  labels = jnp.asarray(train_labels)
  k = min(k, bank.shape[0])

  @jax.jit
  def scores(queries):
    sims = _normalize(queries) @ bank.T
    top_sims, top_index = jax.lax.top_k(sims, k)
    weights = jnp.exp(top_sims / temperature)
    one_hot = jax.nn.one_hot(labels[top_index], num_classes)
    return jnp.sum(one_hot * weights[..., None], axis=1)

  query_features = np.asarray(query_features)
  return np.concatenate([np.asarray(scores(query_features[i:i + chunk]))
                         for i in range(0, len(query_features), chunk)])


def knn_accuracy(train_features, train_labels, eval_features, eval_labels,
                 num_classes: int, k: int = 200, temperature: float = 0.1) -> float:
  scores = knn_predict(train_features, train_labels, eval_features, num_classes, k,
                       temperature)
  return float(np.mean(np.argmax(scores, axis=-1) == np.asarray(eval_labels)))

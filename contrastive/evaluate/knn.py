"""Weighted cosine kNN classifier (Wu et al. 2018), the standard SSL monitor.

The training-feature bank is split along the 'data' axis, as large as the
training split: no device ever holds all of it (ImageNet: 1.28M x 2048 floats,
10.5 GB). Each device scores a chunk of queries against its own rows and keeps
its k best; the k best of those n x k candidates are the exact k nearest
neighbours. Per device, the kNN needs its float32 bank rows, rows/n x dim x 4
bytes (never copied: their norms are divided out of the similarities), plus the
similarities of one chunk of queries, chunk x rows/n x 4 bytes.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from contrastive import parallel
from contrastive.parallel import AXIS


def _normalize(x):
  x = jnp.asarray(x, jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def shard_bank(features, labels, mesh):
  """Host (features, labels), the same on every process -> global arrays split
  along the data axis, padded to a multiple of the devices with label -1."""
  rows = -(-len(labels) // mesh.devices.size) * mesh.devices.size

  def put(x, fill):
    def piece(index):
      start, stop, _ = index[0].indices(rows)    # slice(None) on a one-device mesh
      part = x[start:stop]
      return np.pad(part, [(0, stop - start - len(part))] + [(0, 0)] * (x.ndim - 1),
                    constant_values=fill)
    return jax.make_array_from_callback((rows, *x.shape[1:]), parallel.sharded(mesh),
                                        piece)

  return put(np.asarray(features), 0), put(np.asarray(labels, np.int32), -1)


@functools.lru_cache
def _scorer(mesh, k: int, num_classes: int, temperature: float):
  """Per-replica class scores of replicated queries against the local bank rows.

  Every device ends with the same scores, but as the all_gather's output they
  count as varying over the data axis: each device returns its copy, and the
  host reads one.
  """

  def scores(bank, inverse_norms, labels, queries):
    sims = _normalize(queries) @ bank.astype(jnp.float32).T * inverse_norms
    sims = jnp.where(labels >= 0, sims, -jnp.inf)
    local_sims, local_index = jax.lax.top_k(sims, min(k, bank.shape[0]))
    gather = functools.partial(jax.lax.all_gather, axis_name=AXIS, axis=1, tiled=True)
    sims, labels = gather(local_sims), gather(labels[local_index])
    top_sims, top = jax.lax.top_k(sims, k)
    weights = jnp.exp(top_sims / temperature)
    voters = jnp.take_along_axis(labels, top, axis=1)
    # A scatter-add, not a one-hot [chunk, k, classes] (800 MB at ImageNet's 1000).
    rows = jnp.arange(queries.shape[0])[:, None]
    votes = jnp.zeros((queries.shape[0], num_classes)).at[rows, voters].add(weights)
    return votes[None]

  return parallel.per_replica(scores, mesh, in_specs=(P(AXIS), P(AXIS), P(AXIS), P()),
                              out_specs=P(AXIS))


def knn_predict(train_features, train_labels, query_features, num_classes: int, mesh,
                k: int = 200, temperature: float = 0.1, chunk: int = 1024) -> np.ndarray:
  """Class scores ``[Q, C]`` on host: the k most cosine-similar training features
  vote for their labels with weight exp(similarity / temperature).

  The training bank is host numpy (all rows, the same on every process) or global
  arrays split along the data axis of ``mesh``, label -1 on rows that never vote.
  ``query_features`` are host numpy, the same on every process, so every process
  runs the same chunks. Rows that never vote have similarity -inf, so with k
  above the number of voting rows, the extra neighbours add exp(-inf) = 0.
  """
  if not isinstance(train_features, jax.Array):
    train_features, train_labels = shard_bank(train_features, train_labels, mesh)
  inverse_norms = jax.jit(lambda x: 1 / jnp.maximum(
      jnp.linalg.norm(x.astype(jnp.float32), axis=-1), 1e-12))(train_features)
  score = _scorer(mesh, min(k, len(train_labels)), num_classes, float(temperature))
  queries = np.asarray(query_features, np.float32)
  chunk = min(chunk, len(queries))
  out = []
  for start in range(0, len(queries), chunk):
    part = queries[start:start + chunk]
    padded = np.pad(part, ((0, chunk - len(part)), (0, 0)))
    replicated = jax.make_array_from_process_local_data(parallel.replicated(mesh), padded)
    scores = score(train_features, inverse_norms, train_labels, replicated)
    out.append(np.asarray(scores.addressable_data(0))[0, :len(part)])
  return np.concatenate(out)


def knn_accuracy(train_features, train_labels, eval_features, eval_labels,
                 num_classes: int, mesh, k: int = 200, temperature: float = 0.1) -> float:
  """Top-1 of :func:`knn_predict` on the eval features (host numpy)."""
  scores = knn_predict(train_features, train_labels, eval_features, num_classes, mesh, k,
                       temperature)
  return float(np.mean(np.argmax(scores, axis=-1) == np.asarray(eval_labels)))

"""Contrastive objectives, written per replica with named-axis collectives."""

import jax
import jax.numpy as jnp


def l2_normalize(x, eps=1e-12):
  """Rows scaled to unit length, in float32."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


def nt_xent(z1, z2, temperature: float, axis_name: str | None = None, negatives=None):
  """SimCLR's NT-Xent loss (normalised temperature-scaled cross-entropy).

  Args:
    z1, z2: ``[n, d]`` projections of the two views of the same ``n`` images, any
      scale: they are L2-normalised here.
    temperature: softmax temperature.
    axis_name: when called per replica (inside ``shard_map``), the mesh axis that
      splits the global batch. Negatives are then the views of the whole global
      batch, gathered across that axis, and the returned value is the loss of the
      global batch on every replica, so its gradient is the global gradient.
    negatives: optional ``[K, d]`` stored embeddings, used as stored (already
      normalised): K more negatives for every anchor (SimCLR v2's queue). Per
      replica, this device's ``[K / devices, d]`` rows: every device scores all
      2N anchors against its own rows and the softmax is combined across devices
      by :func:`sharded_logsumexp`, so no device holds all K.

  Returns:
    The mean over all 2N anchors of the cross-entropy of the anchor's positive
    against the other 2N - 1 views (N the global batch size) and the K negatives.
  """
  z1, z2 = l2_normalize(z1), l2_normalize(z2)
  n = z1.shape[0]
  if axis_name is None:
    all1, all2, offset = z1, z2, 0
  else:
    all1 = jax.lax.all_gather(z1, axis_name, tiled=True)
    all2 = jax.lax.all_gather(z2, axis_name, tiled=True)
    offset = jax.lax.axis_index(axis_name) * n
  candidates = jnp.concatenate([all1, all2], axis=0)        # [2N, d]
  global_n = all1.shape[0]

  anchors = jnp.concatenate([z1, z2], axis=0)               # [2n, d]
  logits = anchors @ candidates.T / temperature             # [2n, 2N]
  rows = jnp.arange(n) + offset
  self_index = jnp.concatenate([rows, rows + global_n])
  positive_index = jnp.concatenate([rows + global_n, rows])
  columns = jnp.arange(2 * global_n)
  logits = jnp.where(columns[None, :] == self_index[:, None], -jnp.inf, logits)
  if negatives is None:
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    loss = -jnp.mean(jnp.take_along_axis(log_probs, positive_index[:, None], axis=-1))
  else:
    # Rows self_index of the candidates are this device's anchors: the stored
    # negatives' log-sum-exp of every global anchor, then of this device's.
    stored = candidates @ negatives.astype(jnp.float32).T / temperature   # [2N, K_local]
    stored = sharded_logsumexp(stored, axis_name)[self_index]             # [2n]
    positive = jnp.take_along_axis(logits, positive_index[:, None], axis=-1)[:, 0]
    loss = jnp.mean(sharded_logsumexp(logits, extra=stored) - positive)
  if axis_name is not None:
    loss = jax.lax.pmean(loss, axis_name)
  return loss


def sharded_logsumexp(local_logits, axis_name: str | None = None, extra=None):
  """``logsumexp`` of each row over the union of every device's columns.

  Each device reduces its own columns to a max and a sum of exponentials, and the
  results are combined with one ``pmax`` and one ``psum``: no device holds all
  columns.

  Args:
    local_logits: ``[m, c_local]``, this device's columns for the same ``m`` rows
      on every device (``-inf``: not a column).
    axis_name: the mesh axis the columns are split over; None for one device.
    extra: optional ``[m]``, one more column, the same on every device (counted once).
  """
  row_max = jnp.max(local_logits, axis=-1)
  if extra is not None:
    row_max = jnp.maximum(row_max, extra)
  row_max = jax.lax.stop_gradient(row_max)
  if axis_name is not None:
    row_max = jax.lax.pmax(row_max, axis_name)
  total = jnp.sum(jnp.exp(local_logits - row_max[:, None]), axis=-1)
  if axis_name is not None:
    total = jax.lax.psum(total, axis_name)
  if extra is not None:
    total = total + jnp.exp(extra - row_max)
  return row_max + jnp.log(total)


def sharded_cross_entropy(positive_logits, local_negative_logits,
                          axis_name: str | None = None, negative_mask=None):
  """Per-row cross-entropy of a positive against negatives split across devices.

  The negatives of every row are the union of each device's
  ``local_negative_logits``: a queue or a memory bank whose rows are sharded, so
  no device ever holds all of them (:func:`sharded_logsumexp`).

  Args:
    positive_logits: ``[m]``, the same rows on every device.
    local_negative_logits: ``[m, k_local]``, this device's negatives for those rows.
    axis_name: the mesh axis the negatives are split over; None for one device.
    negative_mask: optional boolean, broadcastable to ``[m, k_local]``: False
      columns are not negatives (sampled rows another device owns, padding).

  Returns:
    ``[m]``: ``logsumexp([positive, all negatives]) - positive``.
  """
  negatives = local_negative_logits
  if negative_mask is not None:
    negatives = jnp.where(negative_mask, negatives, -jnp.inf)
  return sharded_logsumexp(negatives, axis_name, extra=positive_logits) - positive_logits


def sharded_soft_cross_entropy(local_logits, column_offset, targets, target_weights,
                               axis_name: str | None = None, column_mask=None):
  """Cross-entropy against soft targets, the classes split across devices.

  A classifier whose N classes are sharded by rows: each device holds the logits
  of every row against its own classes only, ``[m, c_local]``, columns
  ``column_offset ..`` of the N. The log-sum-exp is :func:`sharded_logsumexp`;
  each target's logit comes from the device that owns its class (one ``psum``).

  Args:
    local_logits: ``[m, c_local]``, the same ``m`` rows on every device.
    column_offset: the global class of this device's first column.
    targets: ``[m, t]`` int, global classes, the same on every device.
    target_weights: ``[m, t]``, each row's target distribution (sums to 1).
    axis_name: the mesh axis the classes are split over; None for one device.
    column_mask: optional boolean ``[c_local]``: False columns are not classes.

  Returns:
    ``[m]``: ``-sum_t w_t log softmax(logits)[target_t]``.
  """
  logits = local_logits
  if column_mask is not None:
    logits = jnp.where(column_mask[None, :], logits, -jnp.inf)
  local = targets - column_offset
  mine = (local >= 0) & (local < logits.shape[1])
  picked = jnp.take_along_axis(local_logits, jnp.clip(local, 0, logits.shape[1] - 1), axis=1)
  target_logit = jnp.sum(jnp.where(mine, picked, 0.0) * target_weights, axis=1)
  if axis_name is not None:
    target_logit = jax.lax.psum(target_logit, axis_name)
  return sharded_logsumexp(logits, axis_name) - target_logit


def info_nce(q, k, negatives, temperature: float, axis_name: str | None = None,
             negative_mask=None):
  """InfoNCE: each query against its positive key and a set of stored negatives.

  The MoCo loss (negatives: the queue) and the memory-bank loss (negatives: bank
  rows). ``q`` and ``k`` are L2-normalised here; ``negatives`` are used as stored
  (already normalised). Per replica (``axis_name`` given), ``q`` and ``k`` are this
  device's part of the global batch and ``negatives`` its shard of the queue: the
  queries are gathered, scored against the local shard, and the softmax is
  combined across devices by :func:`sharded_cross_entropy`.

  Args:
    q, k: ``[n, d]`` queries and their positive keys.
    negatives: ``[K, d]`` (per replica: this device's ``[K / devices, d]``).
    temperature: softmax temperature.
    axis_name: the mesh axis splitting the batch and the negatives.
    negative_mask: optional boolean broadcastable to ``[rows, K_local]`` (rows =
      the global batch per replica) marking which stored rows count as negatives.

  Returns:
    The mean over the (global) batch of the cross-entropy with the positive logit
    ``q.k`` first and the negatives ``q.negatives^T`` after it.
  """
  q, k = l2_normalize(q), l2_normalize(k)
  positive = jnp.sum(q * k, axis=-1) / temperature                  # [n]
  n = q.shape[0]
  if axis_name is not None:
    q = jax.lax.all_gather(q, axis_name, tiled=True)                 # [N, d]
    positive = jax.lax.all_gather(positive, axis_name, tiled=True)  # [N]
  logits = q @ negatives.astype(jnp.float32).T / temperature
  per_row = sharded_cross_entropy(positive, logits, axis_name, negative_mask)
  if axis_name is None:
    return jnp.mean(per_row)
  # Every device holds all N rows; each averages its own and the mean of those
  # is the global loss, written as in nt_xent so gradients stay global.
  mine = jax.lax.dynamic_slice_in_dim(per_row, jax.lax.axis_index(axis_name) * n, n)
  return jax.lax.pmean(jnp.mean(mine), axis_name)


def normalized_mse(predictions, targets, axis_name: str | None = None):
  """BYOL's regression loss: ``|p/|p| - z/|z||^2 = 2 - 2 cos(p, z)`` per row, its
  mean over the (global) batch. ``targets`` receive no gradient."""
  p, z = l2_normalize(predictions), l2_normalize(jax.lax.stop_gradient(targets))
  loss = jnp.mean(2.0 - 2.0 * jnp.sum(p * z, axis=-1))
  if axis_name is not None:
    loss = jax.lax.pmean(loss, axis_name)
  return loss


def in_batch_info_nce(q, k, temperature: float, axis_name: str | None = None):
  """MoCo v3's contrastive loss: each query against the keys of the whole global
  batch, its own key the positive (the others' keys are the negatives).

  Per replica, ``q`` and ``k`` are this device's rows; the keys are gathered
  (they receive no gradient), so each device scores its queries against all N
  keys, and the returned value is the global-batch mean on every replica.
  """
  q, k = l2_normalize(q), l2_normalize(jax.lax.stop_gradient(k))
  n = q.shape[0]
  offset = 0
  if axis_name is not None:
    k = jax.lax.all_gather(k, axis_name, tiled=True)
    offset = jax.lax.axis_index(axis_name) * n
  log_probs = jax.nn.log_softmax(q @ k.T / temperature, axis=-1)      # [n, N]
  loss = -jnp.mean(jnp.take_along_axis(log_probs, (jnp.arange(n) + offset)[:, None],
                                       axis=-1))
  if axis_name is not None:
    loss = jax.lax.pmean(loss, axis_name)
  return loss


def _gathered(x, axis_name: str | None):
  """``x`` of every replica, concatenated in device order, and where this
  replica's rows start in it."""
  if axis_name is None:
    return x, 0
  return (jax.lax.all_gather(x, axis_name, tiled=True),
          jax.lax.axis_index(axis_name) * x.shape[0])


def predictive_cross_entropy(queries, positive_logits, candidates,
                             axis_name: str | None = None):
  """CPC's InfoNCE, per query: against all candidates of the global batch.

  Each query's positive is one of the candidates (its patch's target); the others
  are its negatives. Queries are gathered and scored against this device's
  candidates only, and the softmax is combined across devices by
  :func:`sharded_logsumexp`: a device holds [global queries x local candidates],
  never every candidate.

  Args:
    queries: ``[m, d]`` this device's predictions.
    positive_logits: ``[m]``, each query's logit with its own target.
    candidates: ``[c, d]`` this device's targets.
    axis_name: the mesh axis splitting the batch; None for one device.

  Returns:
    ``[m]``: ``logsumexp(query . every candidate) - positive`` of this device's rows.
  """
  everyone, start = _gathered(queries, axis_name)
  log_sum = sharded_logsumexp(everyone @ candidates.T, axis_name)       # [M]
  return jax.lax.dynamic_slice_in_dim(log_sum, start, queries.shape[0]) - positive_logits


def global_local_nce(sources, targets, clip: float, penalty: float,
                     axis_name: str | None = None):
  """AMDIM's NCE of each image's source vector against every target location.

  Scores are ``<source_i, target_j,l> / sqrt(D)`` for every source image ``i``,
  target image ``j`` and location ``l`` of the global batch; the regulariser is
  ``penalty`` times their mean square, and they are then clipped to ``clip *
  tanh(s / clip)``. For each ``(i, l)`` the positive is location ``l`` of image
  ``i``'s own targets and the negatives are every location of every other image
  (AMDIM's costs.py); each device scores all sources against its own targets.

  Args:
    sources: ``[b, D]`` this device's source vectors.
    targets: ``[b, L, D]`` the same images' target locations.
    clip, penalty: AMDIM's ``tclip`` (20) and regulariser weight (0.05).
    axis_name: the mesh axis splitting the batch; None for one device.

  Returns:
    ``(nce, regulariser)``: the means over the global batch, on every replica.
  """
  scale = 1.0 / jnp.sqrt(jnp.float32(targets.shape[-1]))
  sources, targets = sources.astype(jnp.float32), targets.astype(jnp.float32)
  everyone, start = _gathered(sources, axis_name)
  raw = jnp.einsum('nd,jld->njl', everyone, targets) * scale          # [N, b, L]
  regulariser = penalty * jnp.mean(jnp.square(raw))
  scores = clip * jnp.tanh(raw / clip)
  b = targets.shape[0]
  own = (jnp.arange(everyone.shape[0])[:, None] == start + jnp.arange(b)[None, :])
  negatives = jnp.where(own[:, :, None], -jnp.inf, scores).reshape(everyone.shape[0], -1)
  negative_log_sum = jax.lax.dynamic_slice_in_dim(
      sharded_logsumexp(negatives, axis_name), start, b)                # [b]
  positive = jax.lax.dynamic_slice_in_dim(scores, start, b)[jnp.arange(b), jnp.arange(b)]
  nce = jnp.mean(jnp.logaddexp(positive, negative_log_sum[:, None]) - positive)
  if axis_name is not None:
    nce = jax.lax.pmean(nce, axis_name)
    regulariser = jax.lax.pmean(regulariser, axis_name)
  return nce, regulariser

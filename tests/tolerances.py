"""How closely results computed on different device counts must agree.

The same global batch on 1 and on 8 devices is summed in a different order, so
float32 results differ in their last bits, by an amount that grows with the
magnitude of the summed terms and that differs between CPUs. A fixed absolute
tolerance therefore passes on one machine and fails on another for the elements
near zero of a tensor with large ones. Each compared tensor gets an absolute
tolerance of ``SCALE`` times its own largest magnitude, plus a relative one per
element.

That is still about 1000 times tighter than the bugs these comparisons exist to
catch: gradients n = 8 times too large make every gradient, momentum trace and
update differ by ~7 times their own size, and BatchNorm statistics without their
cross-replica mean differ by several percent of their scale.
"""

import jax
import numpy as np

SCALE = 1e-4
# bfloat16 compute: a float32 BatchNorm output that differs in its last bit
# between layouts rounds to bfloat16 values 2^-8 (0.4%) apart, so gradients
# differ by up to that much of their scale. 1% still fails an 8-times gradient.
BFLOAT16_SCALE = 1e-2


def assert_close(got, want, rtol: float = 2e-4, scale: float = SCALE):
  """``got`` equals ``want`` up to float32 reordering, relative to ``want``'s scale."""
  want = np.asarray(want)
  magnitude = float(np.max(np.abs(want))) if want.size else 0.0
  np.testing.assert_allclose(got, want, rtol=rtol, atol=scale * magnitude)


def assert_trees_close(got, want, rtol: float = 2e-4, scale: float = SCALE):
  jax.tree.map(lambda g, w: assert_close(g, w, rtol, scale), got, want)


def assert_batch_stats_close(got, want, rtol: float = 2e-4):
  """BatchNorm statistics: each running mean at the scale of its own spread.

  A mean is an average of activations that spread by ``sqrt(var)``, and its
  round-off follows that spread even where the mean itself is zero (the input of
  a Dense without bias after a BatchNorm without centring: a mean of 1e-8 that is
  all round-off), so its tolerance is scaled by ``max(|mean|, sqrt(var))``.
  """
  if isinstance(want, dict) and set(want) == {'mean', 'var'}:
    spread = max(float(np.max(np.abs(want['mean']))), float(np.sqrt(np.max(want['var']))))
    np.testing.assert_allclose(got['mean'], want['mean'], rtol=rtol, atol=SCALE * spread)
    assert_close(got['var'], want['var'], rtol)
    return
  assert set(got) == set(want)
  for name in want:
    assert_batch_stats_close(got[name], want[name], rtol)

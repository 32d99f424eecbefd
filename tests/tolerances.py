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


def assert_close(got, want, rtol: float = 2e-4):
  """``got`` equals ``want`` up to float32 reordering, relative to ``want``'s scale."""
  want = np.asarray(want)
  scale = float(np.max(np.abs(want))) if want.size else 0.0
  np.testing.assert_allclose(got, want, rtol=rtol, atol=SCALE * scale)


def assert_trees_close(got, want, rtol: float = 2e-4):
  jax.tree.map(lambda g, w: assert_close(g, w, rtol), got, want)

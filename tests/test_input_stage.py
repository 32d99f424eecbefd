"""The trainer's input stage: batches reach the devices ahead of the step, in
order, with their stream positions, and errors surface where the step asks; the
in-memory path runs without TensorFlow."""

import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from contrastive import loop
from contrastive import parallel


def _host_batches(count, consumed, fail_at=None):
  for i in range(count):
    if i == fail_at:
      raise OSError(f'cannot read batch {i}')
    consumed.append(i)
    yield {'image': np.full((8, 2), i, np.float32), 'position': np.arange(8) + 8 * i}


@pytest.mark.parametrize('size', [0, 2])
def test_batches_arrive_in_order_on_the_devices_with_their_positions(size):
  mesh = parallel.make_mesh()
  consumed = []
  batches = loop.DeviceBatches(_host_batches(6, consumed), mesh, size)
  try:
    for i in range(3):
      batch, position = next(batches)
      assert isinstance(batch['image'], jax.Array) and 'position' not in batch
      assert batch['image'].sharding.is_equivalent_to(parallel.sharded(mesh), 2)
      np.testing.assert_array_equal(np.asarray(batch['image']), i)
      assert position == 8 * (i + 1)
      time.sleep(0.2)        # the thread fills the buffer meanwhile
      # Read ahead: at most `size` batches queued and one being put.
      assert len(consumed) <= i + 1 + (size + 1 if size else 0)
    if size:
      assert len(consumed) >= 3 + size
  finally:
    batches.close()
  assert not any(t.name == 'device-batches' for t in threading.enumerate())


def test_an_input_error_is_raised_by_the_step_that_reaches_it():
  batches = loop.DeviceBatches(_host_batches(6, [], fail_at=2), parallel.make_mesh(), 2)
  try:
    next(batches), next(batches)
    for _ in range(2):     # and again: a second call fails alike, never hangs
      with pytest.raises(OSError, match='cannot read batch 2'):
        next(batches)
  finally:
    batches.close()


def test_close_stops_an_endless_source():
  def endless():
    while True:
      yield {'image': np.zeros((8, 2), np.float32)}
  batches = loop.DeviceBatches(endless(), parallel.make_mesh(), 2)
  next(batches)
  batches.close()
  assert not any(t.name == 'device-batches' for t in threading.enumerate())


_WITHOUT_TENSORFLOW = '''
import sys
sys.modules['tensorflow'] = None            # any import of it raises ImportError
sys.modules['tensorflow_datasets'] = None
from tests.conftest import tiny_config
from contrastive import train
from contrastive import metrics
config = tiny_config()
config.eval.knn_every_epochs = config.num_epochs      # the monitor, once
train.train_and_evaluate(config, sys.argv[1])
knn = [r['monitor/knn_accuracy'] for r in metrics.read_metrics(sys.argv[1]).values()
       if 'monitor/knn_accuracy' in r]
assert len(knn) == 1 and 0 <= knn[0] <= 1, knn
import benchmarks.step
assert 'tensorflow' not in [m for m in sys.modules if sys.modules[m] is not None]
print('trained without tensorflow')
'''


def test_in_memory_training_and_its_benchmark_import_no_tensorflow(tmp_path):
  """GPU hosts often lack TensorFlow: the in-memory path (data, training,
  monitor, evaluation) and the step benchmark must not import it."""
  result = subprocess.run([sys.executable, '-c', _WITHOUT_TENSORFLOW, str(tmp_path / 'run')],
                          capture_output=True, text=True, check=False, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'trained without tensorflow' in result.stdout

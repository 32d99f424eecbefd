"""In-memory pretraining batches: one data order for every device and process layout."""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from contrastive import parallel
from contrastive.data import in_memory
from contrastive.data import source_base
from contrastive.data import sources

TOTAL, GLOBAL_BATCH = 203, 24


def _fake_split(monkeypatch, files, unreadable=()):
  """A split whose images carry their file number as pixel value; the files in
  ``unreadable`` are skipped when their block is decoded."""

  def load(data, split, shard_index=0, shard_count=1):
    start, stop = source_base.shard_bounds(files, shard_index, shard_count)
    kept = np.array([f for f in range(start, stop) if f not in unreadable], np.int32)
    return source_base.ImageArrays(
        np.broadcast_to(kept[:, None, None, None], (len(kept), 1, 1, 1)), kept % 10, 10,
        skipped=stop - start - len(kept))

  monkeypatch.setattr(sources, 'load_arrays', load)


def _mesh(num_devices):
  return Mesh(np.array(jax.devices()[:num_devices]), (parallel.AXIS,))


def _as_process(monkeypatch, index, count, mesh):
  """Makes this process act as process ``index`` of ``count``, each holding an
  equal run of the mesh's devices."""
  per_process = mesh.devices.size // count
  monkeypatch.setattr(jax, 'process_index', lambda: index)
  monkeypatch.setattr(jax, 'process_count', lambda: count)
  monkeypatch.setattr(parallel, 'local_device_positions',
                      lambda _: list(range(index * per_process, (index + 1) * per_process)))


def _processes(config, monkeypatch, num_processes, num_devices=8, seed=5):
  """Each simulated process's data, for one mesh over ``num_devices`` devices."""
  mesh = _mesh(num_devices)
  datas = []
  for index in range(num_processes):
    with monkeypatch.context() as patch:
      _as_process(patch, index, num_processes, mesh)
      datas.append(in_memory.InMemoryTrainData(config.data, mesh,
                                               GLOBAL_BATCH // num_devices, seed))
  return datas


def _global_batch(datas, step):
  parts = [data.batch(step) for data in datas]
  return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


LAYOUTS = [(1, 8), (1, 4), (1, 2), (1, 1), (2, 8), (4, 8)]   # (processes, devices)


def test_global_batches_do_not_depend_on_the_layout(config, monkeypatch):
  """Checkpointed on one layout and resumed on another, a run sees the same
  global batches: devices and processes only decide who holds which rows."""
  _fake_split(monkeypatch, TOTAL)
  steps = range(0, 3 * (TOTAL // GLOBAL_BATCH) + 1)              # into a fourth epoch
  expected = [_global_batch(_processes(config, monkeypatch, 1), step) for step in steps]
  for processes, devices in LAYOUTS[1:]:
    datas = _processes(config, monkeypatch, processes, devices)
    for step, want in zip(steps, expected):
      got = _global_batch(datas, step)
      for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=f'{processes}x{devices}')
  for batch in expected:
    np.testing.assert_array_equal(batch['image'][:, 0, 0, 0], batch['index'])
    np.testing.assert_array_equal(batch['label'], batch['index'] % 10)
  assert not np.array_equal(expected[0]['index'], expected[1]['index'])


@pytest.mark.parametrize('processes,devices', LAYOUTS)
def test_each_epoch_visits_every_image_at_most_once(config, monkeypatch, processes, devices):
  _fake_split(monkeypatch, TOTAL)
  datas = _processes(config, monkeypatch, processes, devices)
  steps = TOTAL // GLOBAL_BATCH
  assert all(data.steps_per_epoch == steps and data.num_examples == TOTAL for data in datas)
  epochs = [np.concatenate([_global_batch(datas, epoch * steps + s)['index']
                            for s in range(steps)]) for epoch in range(2)]
  for drawn in epochs:
    assert len(drawn) == len(set(drawn)) == steps * GLOBAL_BATCH
  assert not np.array_equal(epochs[0], epochs[1])                # reshuffled each epoch


def test_split_indices_stay_dense_when_files_are_unreadable(config, monkeypatch):
  """Blocks are cut from the file list before decoding, so a block that lost
  files is shorter; the indices still number the decoded images 0..N-1, on each
  process's rows and on its evaluation block alike."""
  files, unreadable = 80, {13, 14, 15, 40}
  _fake_split(monkeypatch, files, unreadable)
  decoded = np.array([f for f in range(files) if f not in unreadable])   # index -> file
  datas = _processes(config, monkeypatch, 2)
  assert all((d.num_examples, d.skipped, d.steps_per_epoch) == (76, 4, 3) for d in datas)
  for step in range(3):
    batch = _global_batch(datas, step)
    assert len(set(batch['index'])) == len(batch['index'])
    np.testing.assert_array_equal(decoded[batch['index']], batch['image'][:, 0, 0, 0])
  indices = np.concatenate([data.process_indices() for data in datas])
  np.testing.assert_array_equal(indices, np.arange(76))
  for data in datas:
    np.testing.assert_array_equal(decoded[data.process_indices()],
                                  data.process_block().images[:, 0, 0, 0])


@pytest.mark.parametrize('processes', [1, 2])
def test_process_block_equals_the_loaded_split(config, monkeypatch, processes):
  """Evaluation reuses the training images in memory: they must be exactly the
  process's block as the data module loads it, labels and order included."""
  for index, data in enumerate(_processes(config, monkeypatch, processes, seed=0)):
    block = data.process_block()
    loaded = sources.load_arrays(config.data, 'train', shard_index=index,
                                 shard_count=processes)
    np.testing.assert_array_equal(block.images, loaded.images)
    np.testing.assert_array_equal(block.labels, loaded.labels)
    assert block.num_classes == loaded.num_classes == 10
    start = sum(len(sources.load_arrays(config.data, 'train', shard_index=i,
                                        shard_count=processes).images)
                for i in range(index))
    np.testing.assert_array_equal(data.process_indices(),
                                  np.arange(start, start + len(loaded.images)))


def test_a_split_smaller_than_one_global_batch_is_a_clear_error(config, monkeypatch):
  _fake_split(monkeypatch, GLOBAL_BATCH - 1)
  with pytest.raises(ValueError, match='fewer than one global batch of 24: lower '
                                       'config.global_batch_size'):
    _processes(config, monkeypatch, 1)

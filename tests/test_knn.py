"""The kNN monitor with its training bank split over 8 devices, against a float64
single-device reference: the same neighbours, the same votes, the same top-1."""

import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from contrastive import loop
from contrastive import parallel
from contrastive.data import source_base
from contrastive.evaluate import knn
from contrastive.evaluate import monitor as monitor_lib
from tests import tolerances

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES, K, TEMPERATURE = 5, 7, 0.1


def reference_scores(bank, labels, queries, num_classes, k, temperature):
  """Single-device kNN in float64: sort every similarity, keep the k largest."""
  bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
  queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
  sims = queries.astype(np.float64) @ bank.astype(np.float64).T
  top = np.argsort(-sims, axis=1)[:, :k]
  scores = np.zeros((len(queries), num_classes))
  for row, (neighbours, s) in enumerate(zip(top, sims)):
    np.add.at(scores[row], labels[neighbours], np.exp(s[neighbours] / temperature))
  return scores


@pytest.mark.parametrize('devices', [8, 1])
@pytest.mark.parametrize('k', [1, 5, 7, 20, 37, 100])
def test_sharded_knn_chooses_the_reference_neighbours(k, devices):
  """37 bank rows on 8 devices: 5 per device, 3 padding rows (whose similarity 0
  would beat the negative ones of k = 20); k = 7 exceeds a device's rows, 100 the
  bank's. Each row its own class, so the classes that got votes are the neighbours
  (50 queries in chunks of 16, the last one padded). On one device (a laptop's
  run), the whole bank in one piece."""
  rng = np.random.default_rng(k)
  bank, queries = rng.normal(size=(37, 16)), rng.normal(size=(50, 16))
  labels = np.arange(37)
  mesh = jax.make_mesh((devices,), (parallel.AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:devices])
  got = knn.knn_predict(bank, labels, queries, 37, mesh, k=k,
                        temperature=TEMPERATURE, chunk=16)
  want = reference_scores(bank, labels, queries, 37, min(k, 37), TEMPERATURE)
  np.testing.assert_array_equal(got > 0, want > 0)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def _encode_step(mesh):
  """A fixed linear map of the pixels, per replica like a method's encoder."""
  return parallel.per_replica(
      lambda w, images: images.reshape(len(images), -1).astype(jnp.float32) @ w, mesh,
      in_specs=(P(), P(parallel.AXIS)), out_specs=P(parallel.AXIS))


def _split(seed, size):
  rng = np.random.default_rng(seed)
  return (rng.integers(0, 256, (size, 4, 4, 3), np.uint8),
          rng.integers(0, NUM_CLASSES, size).astype(np.int32))


def _monitor_inputs(train_block, eval_block):
  """What :func:`monitor_lib.monitor` reads: this process's blocks of both splits."""
  mesh = parallel.make_mesh()
  splits = {'train': source_base.ImageArrays(*train_block, NUM_CLASSES),
            'eval': source_base.ImageArrays(*eval_block, NUM_CLASSES),
            'layout': loop.Layout(mesh, 16, 2, 16 // jax.process_count())}
  config = ml_collections.ConfigDict({
      'data': {'image_size': 4, 'in_memory': True},
      'eval': {'knn_k': K, 'knn_temperature': TEMPERATURE}})
  weights = np.random.default_rng(0).normal(size=(48, 8)).astype(np.float32)
  state = jax.make_array_from_process_local_data(parallel.replicated(mesh), weights)
  return state, _encode_step(mesh), config, splits


def _features(images):
  weights = np.random.default_rng(0).normal(size=(48, 8)).astype(np.float32)
  return images.reshape(len(images), -1).astype(np.float32) @ weights


def _reference_accuracy(train_split, eval_split):
  (train_x, train_y), (eval_x, eval_y) = [(_features(images), labels)
                                          for images, labels in (train_split, eval_split)]
  scores = reference_scores(train_x, train_y, eval_x, NUM_CLASSES, K, TEMPERATURE)
  return float(np.mean(np.argmax(scores, 1) == eval_y))


def test_monitor_keeps_the_bank_on_the_devices_and_matches_the_host_path():
  """37 training images in 3 batches of 16 (11 padding rows): in the monitor's
  bank each device holds the rows it encoded, label -1 on padding, and its kNN
  top-1 is the host path's and the reference's."""
  train_split, eval_split = _split(1, 37), _split(2, 21)
  state, encode_step, config, splits = _monitor_inputs(train_split, eval_split)
  features = monitor_lib.split_features(state, encode_step, config, splits, sharded=('train',))
  bank, bank_labels = features['train']
  assert bank.sharding.spec == P(parallel.AXIS)
  assert {s.data.shape for s in bank.addressable_shards} == {(6, 8)}
  # Device d, its b-th batch, its r-th row: row 16 b + 2 d + r of the split.
  order = [16 * b + 2 * d + r for d in range(8) for b in range(3) for r in range(2)]
  padded = np.pad(train_split[0], ((0, 11), (0, 0), (0, 0), (0, 0)))
  tolerances.assert_close(np.asarray(bank), _features(padded)[order])
  np.testing.assert_array_equal(np.asarray(bank_labels),
                                np.pad(train_split[1], (0, 11), constant_values=-1)[order])

  mesh = splits['layout'].mesh
  monitored = monitor_lib.monitor(state, encode_step, None, config,
                                  splits)['monitor/knn_accuracy']
  host = monitor_lib.split_features(state, encode_step, config, splits)
  evaluated = knn.knn_accuracy(*host['train'], *host['eval'], NUM_CLASSES, mesh, k=K,
                               temperature=TEMPERATURE)
  assert monitored == evaluated == _reference_accuracy(train_split, eval_split)


def test_two_processes_match_the_reference():
  """2 processes x 4 devices (gloo over loopback), with unequal blocks (4 and 1
  batches of the training split): every process gets the reference's top-1."""
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             PYTHONPATH=REPO)
  processes = [subprocess.Popen([sys.executable, '-m', 'tests.test_knn', str(port), str(i)],
                                env=env, cwd=REPO, stdout=subprocess.PIPE, text=True)
               for i in range(2)]
  outputs = [p.communicate(timeout=300)[0] for p in processes]
  assert [p.returncode for p in processes] == [0, 0], outputs
  want = _reference_accuracy(_split(1, 37), _split(2, 21))
  for output in outputs:
    assert json.loads(output.splitlines()[-1]) == {'monitor': want, 'evaluate': want}


def _worker(port: int, process_id: int):
  """One process of the two: its block of each split, then monitor and evaluate's kNN."""
  jax.distributed.initialize(f'localhost:{port}', num_processes=2, process_id=process_id)
  (train_images, train_labels), (eval_images, eval_labels) = _split(1, 37), _split(2, 21)
  cut = {'train': 29, 'eval': 11}
  def block(images, labels, split):
    part = slice(0, cut[split]) if process_id == 0 else slice(cut[split], None)
    return images[part], labels[part]
  state, encode_step, config, splits = _monitor_inputs(
      block(train_images, train_labels, 'train'), block(eval_images, eval_labels, 'eval'))
  features = monitor_lib.split_features(state, encode_step, config, splits)
  evaluated = knn.knn_accuracy(*features['train'], *features['eval'], NUM_CLASSES,
                               splits['layout'].mesh, k=K, temperature=TEMPERATURE)
  monitored = monitor_lib.monitor(state, encode_step, None, config, splits)
  print(json.dumps({'monitor': monitored['monitor/knn_accuracy'], 'evaluate': evaluated}))


if __name__ == '__main__':
  _worker(int(sys.argv[1]), int(sys.argv[2]))

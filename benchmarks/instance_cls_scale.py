r"""How the sharded instance classifier scales: memory per device and search time.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python -m benchmarks.instance_cls_scale [--rows=1281167] [--search_rows=25000,50000,100000]

On 8 (simulated) devices it prints, as a table and as JSON on the last line:

- the classifier of ``--rows`` rows of 128 dims: bytes per device for the rows
  and for their SGD momentum, against the bytes the whole table would take;
- the host memory of one real train step with that classifier (a tiny ResNet,
  batch 256 at 16 px, so that the classifier dominates): resident memory before
  the step and its peak during it, sampled every 5 ms;
- the wall time of one neighbour search (each row's 5 most similar rows, the
  smoothing's once-an-epoch pass) for each of ``--search_rows``;
- the classifier's memory per GPU of a 64-GPU ImageNet run (arithmetic, from the
  same layout).
"""

import json
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags
from jax.sharding import NamedSharding, PartitionSpec as P

from contrastive import loop
from contrastive import parallel
from contrastive import train
from contrastive.methods import Context, RunInfo, instance_cls
from contrastive.methods import rows as sharded_rows

flags.DEFINE_integer('rows', 1281167, 'classifier rows (training images)')
flags.DEFINE_list('search_rows', ['25000', '50000', '100000'], 'rows for the search timing')
flags.DEFINE_integer('dim', 128, 'row width')
flags.DEFINE_integer('batch', 256, 'global batch of the train step')
FLAGS = flags.FLAGS
MB = 2 ** 20


def _resident_bytes() -> int:
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * 4096


def _peak_during(fn):
  """(fn's result, peak resident bytes while it ran)."""
  peak, done = [_resident_bytes()], threading.Event()

  def sample():
    while not done.is_set():
      peak[0] = max(peak[0], _resident_bytes())
      time.sleep(0.005)

  sampler = threading.Thread(target=sample)
  sampler.start()
  try:
    result = jax.block_until_ready(fn())
  finally:
    done.set()
    sampler.join()
  return result, peak[0]


def _config():
  from configs import instance_cls_cifar10  # pylint: disable=g-import-not-at-top
  config = instance_cls_cifar10.get_config()
  config.global_batch_size = FLAGS.batch
  config.model.name, config.model.width = 'resnet10', 0.0625
  config.data.image_size = 16
  config.head.out_dim = FLAGS.dim
  config.instance_cls.contrastive_prior = False
  config.instance_cls.smoothing = 0.2
  return config


def train_step_memory(num_rows: int) -> dict:
  config = _config()
  layout = loop.layout(config.global_batch_size)
  mesh, devices = layout.mesh, layout.mesh.devices.size
  method = instance_cls.METHOD
  run = RunInfo(num_examples=num_rows, num_devices=devices, total_steps=10)
  ctx = Context(model=method.build_model(config), config=config, run=run, axis_name='data')
  opt = loop.optimizer(config.optim, config.global_batch_size, 2, 10)
  state = train.init_state(method, ctx, opt.tx, mesh)
  specs = train.state_specs(method, ctx, opt.tx)
  step = parallel.per_replica(train.make_train_step(method, ctx, opt.tx, opt.schedule),
                              mesh, in_specs=(specs, P('data')), out_specs=(specs, P()))
  rng = np.random.default_rng(0)
  size = config.data.image_size
  batch = jax.device_put({
      'image': rng.integers(0, 256, (config.global_batch_size, size, size, 3), np.uint8),
      'index': rng.choice(num_rows, config.global_batch_size, replace=False).astype(np.int32),
      'label': np.full(config.global_batch_size, -1, np.int32)}, NamedSharding(mesh, P('data')))
  compiled = step.lower(state, batch).compile()
  rows = state.params['classifier']
  momentum = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state.opt_state)
              if any(getattr(key, 'key', None) == 'classifier' for key in path)]

  def largest_shard_mb(arrays):
    return max(shard.data.nbytes for a in arrays for shard in a.addressable_shards) / MB

  classifier_mb, momentum_mb = largest_shard_mb([rows]), largest_shard_mb(momentum)
  before = _resident_bytes()
  (state, metrics), peak = _peak_during(lambda: compiled(state, batch))
  return {'rows': num_rows, 'devices': devices, 'rows_per_device': rows.shape[0] // devices,
          'classifier_mb_per_device': classifier_mb,
          'momentum_mb_per_device': momentum_mb,
          'whole_table_mb': num_rows * FLAGS.dim * 4 / MB,
          'host_resident_mb_before_step': before / MB,
          'host_peak_mb_during_step': peak / MB,
          'step_loss': float(metrics['loss'])}


def search_seconds(num_rows: int, repeats: int = 2) -> float:
  mesh = parallel.make_mesh()
  padded = sharded_rows.padded_rows(num_rows, mesh.devices.size)
  table = jax.random.normal(jax.random.key(0), (padded, FLAGS.dim), jnp.float32)
  table = jax.device_put(table / jnp.linalg.norm(table, axis=1, keepdims=True),
                         NamedSharding(mesh, P('data')))
  search = jax.jit(jax.shard_map(
      lambda shard: sharded_rows.nearest_rows(shard, 5, num_rows, 'data', 1024)[0],
      mesh=mesh, in_specs=P('data'), out_specs=P('data')))
  compiled = search.lower(table).compile()
  jax.block_until_ready(compiled(table))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(table))
    times.append(time.perf_counter() - start)
  return min(times)


def main(argv):
  del argv
  memory = train_step_memory(FLAGS.rows)
  searches = {int(n): search_seconds(int(n)) for n in FLAGS.search_rows}
  gpus, imagenet = 64, 1281167
  per_gpu_rows = sharded_rows.padded_rows(imagenet, gpus) // gpus
  per_gpu = {'gpus': gpus, 'rows_per_gpu': per_gpu_rows,
             'classifier_and_momentum_mb': 2 * per_gpu_rows * FLAGS.dim * 4 / MB,
             'logits_mb_at_batch_4096': 4096 * per_gpu_rows * 4 / MB}
  print(f'{memory["rows"]:,} rows x {FLAGS.dim} on {memory["devices"]} devices: '
        f'{memory["rows_per_device"]:,} rows, {memory["classifier_mb_per_device"]:.1f} MB '
        f'+ {memory["momentum_mb_per_device"]:.1f} MB momentum per device '
        f'(whole table {memory["whole_table_mb"]:.1f} MB).')
  print(f'One train step (batch {FLAGS.batch}): host resident '
        f'{memory["host_resident_mb_before_step"]:.0f} MB before, peak '
        f'{memory["host_peak_mb_during_step"]:.0f} MB during.')
  print('Neighbour search (K=5, chunk 1024):')
  base = min(searches)
  for n, seconds in searches.items():
    print(f'  N={n:>8,}: {seconds:7.2f} s   ({seconds / searches[base]:.1f}x N={base:,})')
  print(f'64-GPU ImageNet: {per_gpu["rows_per_gpu"]:,} rows per GPU, '
        f'{per_gpu["classifier_and_momentum_mb"]:.1f} MB for rows + momentum, '
        f'{per_gpu["logits_mb_at_batch_4096"]:.0f} MB of logits at batch 4096.')
  print(json.dumps({'train_step': memory, 'search_seconds': searches, 'per_gpu_64': per_gpu}))


if __name__ == '__main__':
  app.run(main)

r"""What end-to-end contrastive learning costs against MoCo, and what remat saves.

    python -m benchmarks.cost --config=configs/simclr_imagenet.py \
        --config.model.precision=bfloat16 --json=/tmp/cost.json

The MoCo v2 paper's comparison, on one device at one batch (``--batch``, 256):
SimCLR (end to end: both views' gradients flow through one encoder) against MoCo
(the keys come from an EMA encoder that takes no gradient), same network and
image size (the config's). Then SimCLR at ``--large_batch`` (4096) without and
with every ResNet stage rematerialised (``model.remat_stages``), compiled only
unless ``--run_large``, since it rarely fits without remat.

Each row runs in its own process. Per row: the step time (rows that run; OOM
where the step does not fit in device memory), XLA's compiled memory (arguments +
outputs + temporaries), the device's peak memory where the backend reports it,
and the activations the backward pass keeps, the residuals of ``jax.vjp`` of the
method's loss per device, which no compiler scheduling changes. XLA:CPU does not
schedule rematerialised code to save memory (it runs the recomputation early),
so on CPU only that last column shows what remat saves; on a GPU the compiled
and peak memory show it too.
"""

import json
import os
import subprocess
import sys
import tempfile

import jax
from absl import app
from absl import flags
from jax.sharding import PartitionSpec as P
from ml_collections import config_flags

from benchmarks import step as step_bench
from contrastive import models
from contrastive import parallel
from contrastive import train
from contrastive.methods import Batch

FLAGS = flags.FLAGS
GB = 1e9


def saved_activations(step: step_bench.Step, state, batch) -> int:
  """Bytes of the residuals that the method's loss keeps for its backward pass,
  per device, counted while the per-replica step is traced (nothing runs)."""
  method, ctx = step.method, step.ctx
  sizes = []

  def replica(state, batch):
    views = train.device_views(jax.random.key(0), batch, method.views(ctx.config))
    inputs = Batch(views=views, index=batch['index'])

    def loss(params):
      return method.loss(ctx, params, state.model_state, state.method_state, inputs,
                         jax.random.key(1)).loss

    value, backward = jax.vjp(loss, state.params)
    param_bytes = sum(leaf.size * leaf.dtype.itemsize
                      for leaf in jax.tree.leaves(state.params))
    sizes.append(sum(leaf.size * leaf.dtype.itemsize
                     for leaf in jax.tree.leaves(backward)) - param_bytes)
    return value

  jax.eval_shape(parallel.per_replica(replica, step.mesh, in_specs=(step.specs, P(parallel.AXIS)),
                                      out_specs=P()), state, batch)
  return int(sizes[0])


def measure(config, name: str, run: bool, steps: int, compile_step: bool = True) -> dict:
  """The variant's row; a step that does not fit in device memory is a row with
  its compiled figures and an 'error', not a failure. Without ``compile_step``
  only the saved activations, which tracing alone gives."""
  step = step_bench.Step(config, num_examples=50000)
  state = jax.eval_shape(step.init_state) if not run else step.init_state()
  batch = step_bench.synthetic_batch(config, step.method, step.mesh, 50000)
  row = {'name': name, 'method': config.method, 'model': config.model.name,
         'width': config.model.width, 'image_size': config.data.image_size,
         'batch': config.global_batch_size,
         'precision': models.compute_dtype(config.model).name,
         'remat_stages': list(config.model.remat_stages), 'compile_seconds': None,
         'compiled_bytes': None, 'saved_activation_bytes': saved_activations(step, state, batch),
         'step_seconds': None, 'peak_device_bytes': None}
  if not compile_step:
    return row
  compiled, row['compile_seconds'], analysis = step.compile(state, batch)
  row['compiled_bytes'] = step_bench.compiled_bytes(analysis)
  if run:
    try:
      _, figures = step_bench.time_steps(compiled, state, batch, step.mesh, steps, 1, None)
    except jax.errors.JaxRuntimeError as error:
      row['error'] = step_bench.out_of_memory(error)
    else:
      row['step_seconds'] = figures['step_seconds']
    row['peak_device_bytes'] = step_bench.peak_device_bytes()
  return row


def variants() -> list[tuple]:
  """(name, method, batch, remat stages, run) of each row, in order."""
  return [('end-to-end (SimCLR)', 'simclr', FLAGS.batch, (), True),
          ('MoCo (EMA keys, queue)', 'moco', FLAGS.batch, (), True),
          ('SimCLR, no remat', 'simclr', FLAGS.large_batch, (), FLAGS.run_large),
          ('SimCLR, remat stages 1-4', 'simclr', FLAGS.large_batch, (1, 2, 3, 4),
           FLAGS.run_large)]


def measure_variant(index: int) -> dict:
  name, method, batch, remat, run = variants()[index]
  config = FLAGS.config.copy_and_resolve_references()
  config.method, config.global_batch_size = method, batch
  config.model.remat_stages = remat
  config.data.in_memory = True           # synthetic images, crops on the device
  config.moco.queue_size = max(config.moco.queue_size // batch, 1) * batch
  return {**measure(config, name, run and not FLAGS.activations_only, FLAGS.steps,
                   compile_step=not FLAGS.activations_only),
          'machine': step_bench.machine()}


def in_own_process(index: int) -> dict:
  """``measure_variant(index)`` in a fresh interpreter, so that each row's peak
  device memory is its own (the high-water mark is per process and never falls)
  and a row that fails does not take the others with it."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, 'PYTHONPATH': os.pathsep.join(
      filter(None, [root, os.environ.get('PYTHONPATH')]))}
  with tempfile.TemporaryDirectory() as folder:
    path = os.path.join(folder, 'row.json')
    result = subprocess.run([sys.executable, '-m', 'benchmarks.cost', *sys.argv[1:],
                             f'--variant={index}', f'--row_json={path}'], env=env, check=False)
    if result.returncode or not os.path.exists(path):
      name, _, batch, remat, _ = variants()[index]
      return {'name': name, 'batch': batch, 'remat_stages': list(remat),
              'error': f'failed with exit code {result.returncode} (its output is above)'}
    with open(path) as f:
      return json.load(f)


def _line(row: dict) -> str:
  def gb(value):
    return '-' if value is None else f'{value / GB:.2f}'
  if 'saved_activation_bytes' not in row:
    return f'{row["name"]:<26}{row["batch"]:>6}  {row["error"]}'
  seconds = ('OOM' if row.get('error', '').startswith('out of memory') else
             '-' if row['step_seconds'] is None else f'{1000 * row["step_seconds"]:.1f}')
  return (f'{row["name"]:<26}{row["batch"]:>6}{row["precision"]:>10}{seconds:>11}'
          f'{gb(row["compiled_bytes"]):>10}{gb(row["peak_device_bytes"]):>9}'
          f'{gb(row["saved_activation_bytes"]):>14}')


def main(argv):
  del argv
  if FLAGS.variant >= 0:    # one row, in the process in_own_process started
    with open(FLAGS.row_json, 'w') as f:
      json.dump(measure_variant(FLAGS.variant), f, default=str)
    return
  print(f'{"":<26}{"batch":>6}{"precision":>10}{"step ms":>11}{"XLA GB":>10}'
        f'{"peak GB":>9}{"saved act GB":>14}')
  rows = []
  for index in range(len(variants())):
    rows.append(in_own_process(index))
    print(_line(rows[-1]), flush=True)
  end_to_end, moco, no_remat, remat = rows
  if end_to_end.get('step_seconds') and moco.get('step_seconds'):
    print(f'end-to-end / MoCo: time {end_to_end["step_seconds"] / moco["step_seconds"]:.2f}x, '
          f'saved activations '
          f'{end_to_end["saved_activation_bytes"] / moco["saved_activation_bytes"]:.2f}x')
  if no_remat.get('saved_activation_bytes') and remat.get('saved_activation_bytes'):
    print(f'remat keeps {remat["saved_activation_bytes"] / no_remat["saved_activation_bytes"]:.2f}'
          ' of the activations')
  machine = next((row['machine'] for row in rows if 'machine' in row), None)
  print(json.dumps(machine))
  if FLAGS.json:
    with open(FLAGS.json, 'w') as f:
      json.dump({'machine': machine, 'config': FLAGS.config.to_dict(), 'rows': rows},
                f, indent=2, default=str)


if __name__ == '__main__':
  config_flags.DEFINE_config_file('config', None, 'experiment config', lock_config=True)
  flags.DEFINE_integer('batch', 256, 'batch of the SimCLR / MoCo comparison')
  flags.DEFINE_integer('large_batch', 4096, 'batch of the remat comparison')
  flags.DEFINE_bool('run_large', False, 'run the large-batch steps, not only compile them')
  flags.DEFINE_integer('steps', 5, 'timed steps')
  flags.DEFINE_bool('activations_only', False,
                    'only the activations each row keeps, from tracing: nothing is '
                    'compiled or run, so any model and batch takes seconds on a CPU')
  flags.DEFINE_string('json', '', 'write every figure here')
  flags.DEFINE_integer('variant', -1, 'internal: measure only this row, in this process')
  flags.DEFINE_string('row_json', '', 'internal: where --variant writes its row')
  app.run(main)

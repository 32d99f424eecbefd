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
and peak memory show it too (and on CPU remat's step time may not show the
recomputation either).

``--compare=cpc``: CPC v2 (``--cpc_config``, a 7 x 7 grid of 64 px patches of a
256 px image: 49 encoder passes an image) against SimCLR (``--config``) at the
same ``--batch`` of images, each without and with every ResNet stage
rematerialised, all four timed (on a 2-core CPU about 25 minutes)::

    python -m benchmarks.cost --compare=cpc --config=configs/simclr_imagenet.py \
        --cpc_config=configs/cpc_imagenet.py --batch=8 --steps=3 --json=/tmp/cpc_cost.json

The rows' step times and saved activations per image are also given as ratios
to the SimCLR row of the same run (times on a shared machine move; their ratio
less). Then the memory that CPC v2 needs per device on ``--gpus`` (64) devices
at ``--cpc_config``'s global batch (512: b = 8 images a device)::

    per device = b x A + P + P + S

A the saved activations per image (the CPC rows of this run, at ``--batch``),
P the parameters' bytes (and as many again for their gradients), S the
optimizer's state (measured; Adam's two moments: 2 x P). Activations grow with
the images a device holds, except the loss's float32 scores of every prediction
of the global batch against the device's own patches (B x 126 x b x 49 for a
global batch of B images of 49 patches, 126 predictions each with the config's
directions and offsets: about 0.1 GB at B = 512), which ``b x A`` measured at a
small batch misses: two more rows trace the step itself (nothing compiled or
run) on ``--gpus`` simulated CPU devices at the global batch, the figure the
extrapolation is checked against. Not counted either way: XLA's temporaries
(convolution workspaces, values alive in the forward pass before the backward
takes them), the input batch, and the allocator's fragmentation; on GPUs, the
compiled and peak memory of a real ``--gpus`` run are the figures that decide.
``--activations_only`` skips the compiles and steps (seconds on a CPU), e.g.
with ``--config.model.precision=bfloat16 --cpc_config.model.precision=bfloat16``
for the activations of a GPU run, whose 'auto' precision is bfloat16.
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
MB = 1e6
REMAT_ALL = (1, 2, 3, 4)


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


def tree_bytes(tree) -> int:
  return int(sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree)))


def measure(config, name: str, run: bool, steps: int, compile_step: bool = True) -> dict:
  """The variant's row; a step that does not fit in device memory is a row with
  its compiled figures and an 'error', not a failure. Without ``compile_step``
  only the saved activations, which tracing alone gives. ``param_bytes`` and
  ``opt_state_bytes``: the parameters and the optimizer's state, per device."""
  step = step_bench.Step(config, num_examples=50000)
  state = jax.eval_shape(step.init_state) if not run else step.init_state()
  batch = step_bench.synthetic_batch(config, step.method, step.mesh, 50000)
  row = {'name': name, 'method': config.method, 'model': config.model.name,
         'width': config.model.width, 'image_size': config.data.image_size,
         'batch': config.global_batch_size, 'devices': int(step.mesh.devices.size),
         'precision': models.compute_dtype(config.model).name,
         'remat_stages': list(config.model.remat_stages), 'compile_seconds': None,
         'compiled_bytes': None, 'saved_activation_bytes': saved_activations(step, state, batch),
         'param_bytes': tree_bytes(state.params), 'opt_state_bytes': tree_bytes(state.opt_state),
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
  """(name, method, batch, remat stages, run, devices) of each row, in order.
  ``devices``: None for this machine's, else that many simulated CPU devices on
  which the row is traced only (its saved activations)."""
  if FLAGS.compare == 'cpc':
    gpus, batch = FLAGS.gpus, FLAGS.cpc_config.global_batch_size
    return [('SimCLR', 'simclr', FLAGS.batch, (), True, None),
            ('SimCLR, remat stages 1-4', 'simclr', FLAGS.batch, REMAT_ALL, True, None),
            ('CPC v2', 'cpc', FLAGS.batch, (), True, None),
            ('CPC v2, remat stages 1-4', 'cpc', FLAGS.batch, REMAT_ALL, True, None),
            (f'CPC v2, {gpus} x {batch // gpus}', 'cpc', batch, (), False, gpus),
            (f'CPC v2, remat, {gpus} x {batch // gpus}', 'cpc', batch, REMAT_ALL, False, gpus)]
  return [('end-to-end (SimCLR)', 'simclr', FLAGS.batch, (), True, None),
          ('MoCo (EMA keys, queue)', 'moco', FLAGS.batch, (), True, None),
          ('SimCLR, no remat', 'simclr', FLAGS.large_batch, (), FLAGS.run_large, None),
          ('SimCLR, remat stages 1-4', 'simclr', FLAGS.large_batch, REMAT_ALL,
           FLAGS.run_large, None)]


def measure_variant(index: int) -> dict:
  name, method, batch, remat, run, devices = variants()[index]
  config = (FLAGS.cpc_config if method == 'cpc' else FLAGS.config).copy_and_resolve_references()
  config.method, config.global_batch_size = method, batch
  config.model.remat_stages = remat
  config.data.in_memory = True           # synthetic images, crops on the device
  config.moco.queue_size = max(config.moco.queue_size // batch, 1) * batch
  trace_only = FLAGS.activations_only or devices is not None
  return {**measure(config, name, run and not trace_only, FLAGS.steps,
                   compile_step=not trace_only),
          'machine': step_bench.machine()}


def in_own_process(index: int, extra_flags=()) -> dict:
  """``measure_variant(index)`` in a fresh interpreter, so that each row's peak
  device memory is its own (the high-water mark is per process and never falls)
  and a row that fails does not take the others with it. A row on simulated
  devices gets them there (XLA's host platform, JAX on the CPU only)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, 'PYTHONPATH': os.pathsep.join(
      filter(None, [root, os.environ.get('PYTHONPATH')]))}
  devices = variants()[index][5]
  if devices is not None:
    env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') +
                        f' --xla_force_host_platform_device_count={devices}').strip()
    env['JAX_PLATFORMS'] = 'cpu'
  with tempfile.TemporaryDirectory() as folder:
    path = os.path.join(folder, 'row.json')
    result = subprocess.run([sys.executable, '-m', 'benchmarks.cost', *sys.argv[1:],
                             *extra_flags, f'--variant={index}', f'--row_json={path}'],
                            env=env, check=False)
    if result.returncode or not os.path.exists(path):
      name, _, batch, remat, _, _ = variants()[index]
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


def _activations_per_image(row: dict) -> float | None:
  """Saved activation bytes per image a device holds."""
  if row.get('saved_activation_bytes') is None:
    return None
  return row['saved_activation_bytes'] * row['devices'] / row['batch']


def cpc_memory(rows: list[dict], per_device: int) -> list[dict]:
  """Per device of the ``--gpus`` CPC run, ``per_device`` images each: for each of
  no remat and remat, activations ``per_device`` x the measured row's per image
  (``'extrapolated'``) and the traced row's own (``'traced'``), each plus the
  parameters, as many bytes of gradients, and the optimizer's state."""
  _, _, measured, measured_remat, traced, traced_remat = rows
  estimates = []
  for remat, small, full in ((False, measured, traced), (True, measured_remat, traced_remat)):
    known = next((row for row in (small, full) if 'param_bytes' in row), None)
    if known is None:
      continue
    fixed = {'param_bytes': known['param_bytes'], 'gradient_bytes': known['param_bytes'],
             'opt_state_bytes': known['opt_state_bytes']}
    per_image = _activations_per_image(small)
    for how, activations in (('extrapolated', None if per_image is None else
                              per_device * per_image),
                             ('traced', full.get('saved_activation_bytes'))):
      if activations is not None:
        estimates.append({'remat': remat, 'activations': how, 'images_per_device': per_device,
                          'activations_per_image_bytes': per_image, 'activation_bytes': activations,
                          **fixed, 'total_bytes': activations + sum(fixed.values())})
  return estimates


def _cpc_lines(rows: list[dict], memory: list[dict]) -> list[str]:
  """Each timed row against the SimCLR row of the same run, then ``memory``."""
  simclr = rows[0]
  lines = [f'against SimCLR at batch {simclr["batch"]}, this run '
           f'({simclr.get("precision", "?")}):',
           f'{"":<26}{"step ms":>10}{"x SimCLR":>10}{"act MB/image":>14}{"x SimCLR":>10}']
  ratio = lambda a, b: '-' if a is None or not b else f'{a / b:.2f}'
  for row in rows[:4]:
    seconds, per_image = row.get('step_seconds'), _activations_per_image(row)
    lines.append(f'{row["name"]:<26}{"-" if seconds is None else f"{1000 * seconds:.1f}":>10}'
                 f'{ratio(seconds, simclr.get("step_seconds")):>10}'
                 f'{"-" if per_image is None else f"{per_image / MB:.1f}":>14}'
                 f'{ratio(per_image, _activations_per_image(simclr)):>10}')
  for plain, remat in (rows[0:2], rows[2:4]):
    if _activations_per_image(plain) and _activations_per_image(remat):
      time = ratio(remat.get('step_seconds'), plain.get('step_seconds'))
      lines.append(f'remat of stages 1-4 keeps '
                   f'{ratio(_activations_per_image(remat), _activations_per_image(plain))} of '
                   f'{plain["name"]}\'s activations'
                   + ('' if time == '-' else f', at {time}x its step time'))
  if memory:
    size = next(row['image_size'] for row in rows[2:] if 'image_size' in row)
    batch, per_device = rows[4]['batch'], memory[0]['images_per_device']
    lines += [f'{size} px CPC v2 on {batch // per_device} devices at global batch {batch} '
              f'(b = {per_device} images each), GB a device: b x A (or traced) + P + P + S',
              f'{"":<34}{"activations":>12}{"params":>8}{"grads":>8}{"optim":>8}{"total":>8}']
    for estimate in memory:
      how = ('traced' if estimate['activations'] == 'traced' else
             f'{estimate["images_per_device"]} x '
             f'{estimate["activations_per_image_bytes"] / MB:.1f} MB')
      label = f'{"remat 1-4" if estimate["remat"] else "no remat"}, {how}'
      lines.append(f'{label:<34}{estimate["activation_bytes"] / GB:>12.2f}'
                   f'{estimate["param_bytes"] / GB:>8.2f}{estimate["gradient_bytes"] / GB:>8.2f}'
                   f'{estimate["opt_state_bytes"] / GB:>8.2f}{estimate["total_bytes"] / GB:>8.2f}')
    lines.append('(A: saved activations per image, P: parameters, as many again for the '
                 'gradients, S: the optimizer\'s state; XLA\'s temporaries and the input '
                 'are not counted)')
  return lines


def main(argv):
  del argv
  if FLAGS.compare == 'cpc':
    if FLAGS.cpc_config is None:
      raise app.UsageError('--compare=cpc needs --cpc_config (configs/cpc_imagenet.py).')
    if FLAGS.cpc_config.global_batch_size % FLAGS.gpus:
      raise app.UsageError(f'--gpus={FLAGS.gpus} does not divide the CPC config\'s '
                           f'global_batch_size={FLAGS.cpc_config.global_batch_size}.')
  if FLAGS.variant >= 0:    # one row, in the process in_own_process started
    with open(FLAGS.row_json, 'w') as f:
      json.dump(measure_variant(FLAGS.variant), f, default=str)
    return
  print(f'{"":<26}{"batch":>6}{"precision":>10}{"step ms":>11}{"XLA GB":>10}'
        f'{"peak GB":>9}{"saved act GB":>14}')
  rows = []
  for index in range(len(variants())):
    extra = ()
    if variants()[index][5] is not None and 'precision' in rows[2]:
      # Simulated CPU devices: at the precision the CPC row ran at ('auto' there
      # would mean float32 even beside a GPU).
      extra = (f'--cpc_config.model.precision={rows[2]["precision"]}',)
    rows.append(in_own_process(index, extra))
    print(_line(rows[-1]), flush=True)
  memory = None
  if FLAGS.compare == 'cpc':
    memory = cpc_memory(rows, FLAGS.cpc_config.global_batch_size // FLAGS.gpus)
    print('\n'.join(_cpc_lines(rows, memory)))
  else:
    end_to_end, moco, no_remat, remat = rows
    if end_to_end.get('step_seconds') and moco.get('step_seconds'):
      print(f'end-to-end / MoCo: time {end_to_end["step_seconds"] / moco["step_seconds"]:.2f}x, '
            f'saved activations '
            f'{end_to_end["saved_activation_bytes"] / moco["saved_activation_bytes"]:.2f}x')
    if no_remat.get('saved_activation_bytes') and remat.get('saved_activation_bytes'):
      print(f'remat keeps '
            f'{remat["saved_activation_bytes"] / no_remat["saved_activation_bytes"]:.2f}'
            ' of the activations')
  machine = next((row['machine'] for row in rows if 'machine' in row), None)
  print(json.dumps(machine))
  if FLAGS.json:
    configs = {'config': FLAGS.config.to_dict()}
    if FLAGS.compare == 'cpc':
      configs['cpc_config'] = FLAGS.cpc_config.to_dict()
    with open(FLAGS.json, 'w') as f:
      json.dump({'machine': machine, **configs, 'rows': rows,
                 **({} if memory is None else {'memory_per_device': memory})},
                f, indent=2, default=str)


if __name__ == '__main__':
  config_flags.DEFINE_config_file('config', None, 'experiment config', lock_config=True)
  flags.DEFINE_enum('compare', 'moco', ['moco', 'cpc'], 'moco: SimCLR against MoCo, then '
                    'remat at --large_batch; cpc: CPC v2 against SimCLR at --batch, each '
                    'with and without remat, and the memory of a --gpus CPC run')
  config_flags.DEFINE_config_file('cpc_config', None, 'CPC v2 config, for --compare=cpc',
                                  lock_config=True)
  flags.DEFINE_integer('gpus', 64, '--compare=cpc: devices of the CPC run whose memory per '
                       'device is estimated, at --cpc_config\'s global batch')
  flags.DEFINE_integer('batch', 256, 'batch of the SimCLR / MoCo (or CPC v2) comparison')
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

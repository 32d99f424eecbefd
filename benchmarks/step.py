r"""Images/s of the train step: synthetic input on the device, then each real input path.

    python -m benchmarks.step --config=configs/simclr_cifar10.py \
        --config.global_batch_size=256 --precisions=float32,bfloat16 \
        --inputs=synthetic,in_memory,streamed \
        --config.data.source=folder --config.data.path=/tmp/data/cifar10/train \
        --torch --json=/tmp/step.json

One row per (precision, input): the method and network are the config's, the
step is the trainer's (:func:`contrastive.train.make_train_step`, on every local
device), and real batches reach it through the trainer's input stage
(:class:`contrastive.loop.DeviceBatches`, ``data.prefetch`` ahead; ``--prefetch``
lists the depths to compare, 0 being no prefetch):

- ``synthetic``: one batch of random uint8 images built once on the device, the
  step's ceiling (for a streamed config, random host-cropped views);
- ``in_memory``: the folder decoded once into host memory, crops on the device;
- ``streamed``: the tf.data stage (decode, crop, flip on the host), which needs
  TensorFlow; the other inputs import none.

Each row gives the compile time (apart), the step time and images/s over
``--steps`` steps after ``--warmup``, the share of that time the loop waited for
input, XLA's compiled memory (arguments + outputs + temporaries) and, where the
backend reports it, the device's peak memory: the process's high-water mark (which
also holds every row's state) where the row's first round raised it, else '-',
since the mark then belongs to an earlier row. With ``--rounds=R`` the rows take R
turns and report their median turn, so that drift in the machine's speed does not
favour one input. ``--torch`` first runs ``benchmarks/torch_reference.py`` (the
same SimCLR step in PyTorch, its own interpreter, before JAX takes the GPU's
memory) for each precision and prints ours / PyTorch on synthetic input.
``--profile_steps=K`` then traces K more steps of each synthetic row and prints
its top XLA ops by time and the time by category (convolution, matmul, layout
copies, ...; see :mod:`benchmarks.op_profile`); ``--profile_dir`` keeps the
traces for TensorBoard.
Images/s count each image once, not once per view. The table is printed, and
the JSON (``--json``) has every figure and the machine.
"""

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
from absl import app
from absl import flags
from jax.sharding import PartitionSpec as P
from ml_collections import config_flags

from benchmarks import op_profile
from contrastive import loop
from contrastive import optim
from contrastive import parallel
from contrastive import train
from contrastive.methods import Context, RunInfo, get_method

FLAGS = flags.FLAGS
GB = 1e9


# ----------------------------------------------------------------------------- setup

class Step:
  """The trainer's step and state for ``config`` on a 'data' mesh of all devices."""

  def __init__(self, config, num_examples: int):
    self.config = config
    self.method = get_method(config.method)
    self.mesh = parallel.make_mesh()
    self.run = RunInfo(num_examples=num_examples, num_devices=self.mesh.devices.size,
                       total_steps=1000)
    self.ctx = Context(model=self.method.build_model(config), config=config, run=self.run,
                       axis_name=parallel.AXIS)
    schedule = optim.learning_rate_schedule(0.1, 10, 1000)
    self.tx = optim.make_optimizer(config.optim, schedule)
    self.specs = train.state_specs(self.method, self.ctx, self.tx)
    self.fn = parallel.per_replica(
        train.make_train_step(self.method, self.ctx, self.tx, schedule), self.mesh,
        in_specs=(self.specs, P(parallel.AXIS)), out_specs=(self.specs, P()),
        donate_argnums=(0,))

  def init_state(self):
    return train.init_state(self.method, self.ctx, self.tx, self.mesh)

  def compile(self, state, batch):
    """(compiled step, seconds, XLA's memory analysis) for ``batch``'s shapes."""
    start = time.perf_counter()
    compiled = self.fn.lower(state, batch).compile()
    return compiled, time.perf_counter() - start, compiled.memory_analysis()


def synthetic_batch(config, method, mesh, num_examples: int):
  """A random global batch in the trainer's layout, built once on the devices."""
  rng = np.random.default_rng(0)
  batch_size = config.global_batch_size // jax.process_count()
  size = config.data.image_size
  batch = {'label': rng.integers(0, 10, batch_size).astype(np.int32),
           'index': rng.permutation(num_examples)[:batch_size].astype(np.int32)}
  if config.data.in_memory:
    batch['image'] = rng.integers(0, 256, (batch_size, size, size, 3), np.uint8)
  else:
    batch['views'] = tuple(rng.integers(0, 256, (batch_size, v.size, v.size, 3), np.uint8)
                           for v in method.views(config))
  return parallel.host_to_global(batch, mesh)


def real_batches(config, method, mesh):
  """(endless host batches of the configured source, images in the split)."""
  local_batch = config.global_batch_size // jax.process_count()
  if config.data.in_memory:
    from contrastive.data import in_memory  # pylint: disable=g-import-not-at-top
    data = in_memory.InMemoryTrainData(config.data, mesh,
                                       config.global_batch_size // mesh.devices.size,
                                       config.seed)
    return data.batches(0), data.num_examples
  from contrastive.data import pipeline  # pylint: disable=g-import-not-at-top
  from contrastive.data import sources  # pylint: disable=g-import-not-at-top
  return (pipeline.train_iterator(config.data, method.views(config), local_batch,
                                  seed=config.seed, shard_index=jax.process_index(),
                                  shard_count=jax.process_count()),
          sources.split_info(config.data, 'train').num_examples)


# ----------------------------------------------------------------------------- timing

def time_steps(compiled, state, batches, mesh, steps: int, warmup: int,
               prefetch: int | None):
  """Seconds per step and the share spent waiting for input, the trainer's way:
  ``batches`` are host batches through ``DeviceBatches`` (``prefetch`` deep), or
  with ``prefetch=None`` one device batch used for every step."""
  device_batches = (None if prefetch is None else
                    loop.DeviceBatches(batches, mesh, prefetch))
  waited = 0.0
  try:
    for i in range(warmup + steps):
      if i == warmup:
        jax.block_until_ready(state)
        start, waited = time.perf_counter(), 0.0
      asked = time.perf_counter()
      batch = batches if device_batches is None else next(device_batches)[0]
      waited += time.perf_counter() - asked
      state, scalars = compiled(state, batch)
    jax.block_until_ready((state, scalars))
    elapsed = time.perf_counter() - start
  finally:
    if device_batches is not None:
      device_batches.close()
  return state, {'step_seconds': elapsed / steps, 'input_wait_fraction': waited / elapsed,
                 'loss': float(scalars['loss'])}


def profile_step(compiled, state, batch, mesh, steps: int, log_dir: str, top: int):
  """(state, the top ops of ``steps`` traced steps on ``batch``, see
  :func:`op_profile.top_ops`). A trace without ops of the step yields its planes
  and lines instead, so that a backend's other layout can be read."""
  timed = {}

  def run():
    timed['state'], timed['figures'] = time_steps(compiled, state, batch, mesh, steps,
                                                  warmup=0, prefetch=None)

  path = op_profile.trace(run, log_dir)
  trace, text = op_profile.load(path), compiled.as_text()
  times = op_profile.op_times(trace, op_profile.module_name(text))
  if not times:
    return timed['state'], {'error': 'no op of the step in the trace', 'trace': path,
                            'lines': op_profile.trace_summary(trace)}
  profile = op_profile.top_ops(times, op_profile.describe_ops(text), steps, top)
  return timed['state'], {**profile, 'steps': steps, 'trace': path,
                          'step_ms': 1000 * timed['figures']['step_seconds']}


def out_of_memory(error: jax.errors.JaxRuntimeError) -> str:
  """A row's 'error' for a step that does not fit in device memory; any other
  error is raised again."""
  if 'RESOURCE_EXHAUSTED' not in str(error):
    raise error
  return 'out of memory: ' + str(error).strip().splitlines()[0][:300]


def peak_device_bytes() -> int | None:
  """The allocator's high-water mark on the first local device (GPU, TPU); None
  on CPU, which keeps no such statistic."""
  stats = jax.local_devices()[0].memory_stats()
  return None if not stats else stats.get('peak_bytes_in_use')


def compiled_bytes(analysis) -> int | None:
  if analysis is None:
    return None
  return int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes
             - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes)


def num_parameters(state) -> int:
  """Trainable parameters of the encoder and head (what the PyTorch model has)."""
  params = state.params
  return int(sum(leaf.size for name in ('encoder', 'head') if name in params
                 for leaf in jax.tree.leaves(params[name])))


# ----------------------------------------------------------------------------- torch

def torch_reference(config, precision: str, steps: int, warmup: int, extra_flags=(),
                    timeout: float | None = None) -> dict:
  """benchmarks/torch_reference.py's figures for the same SimCLR step, on the GPU
  where PyTorch sees one (channels_last and torch.compile there: PyTorch at its
  best), else the CPU.

  Called before this process first touches a JAX device, because JAX then takes
  most of the GPU's memory for itself (XLA_PYTHON_CLIENT_PREALLOCATE) and would
  leave PyTorch too little. Within `timeout`, torch.compile gets half: a slower
  one leaves time to time eager mode (the report then says why it is eager)."""
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'torch_reference.py')
  with tempfile.TemporaryDirectory() as folder:
    out = os.path.join(folder, 'torch.json')
    command = [sys.executable, script, f'--model={config.model.name}',
               f'--width={config.model.width}', f'--stem={config.model.stem}',
               f'--image_size={config.data.image_size}',
               f'--batch={config.global_batch_size}',
               f'--temperature={config.simclr.temperature}',
               f'--optimizer={"lars" if config.optim.name == "lars" else "sgd"}',
               f'--precision={"bf16" if precision == "bfloat16" else "fp32"}',
               '--best_on_gpu', f'--steps={steps}', f'--warmup={max(warmup, 1)}',
               f'--threads={os.cpu_count()}', f'--json={out}',
               *([f'--compile_seconds={timeout / 2:g}'] if timeout else []), *extra_flags]
    try:
      result = subprocess.run(command, capture_output=True, text=True, check=False,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
      return {'error': [f'did not finish within --torch_seconds={timeout:g}']}
    if result.returncode:
      return {'error': (result.stderr or result.stdout).strip().splitlines()[-1:]}
    with open(out) as f:
      return json.load(f)


# ----------------------------------------------------------------------------- main

def machine() -> dict:
  cpu = platform.processor()
  try:
    with open('/proc/cpuinfo') as f:
      cpu = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
  except (OSError, StopIteration):
    pass
  devices = jax.devices()
  return {'cpu': cpu, 'cpu_cores': os.cpu_count(), 'backend': jax.default_backend(),
          'devices': f'{len(devices)} x {devices[0].device_kind}', 'jax': jax.__version__,
          'python': platform.python_version()}


def benchmark(config, precisions, inputs, prefetch, steps: int, warmup: int,
              num_examples: int, rounds: int, profile_steps: int = 0,
              profile_dir: str = '', profile_top: int = 15) -> list[dict]:
  """One row per (precision, input, prefetch depth).

  Every row is compiled first, then the rows take turns: ``rounds`` rounds of
  ``warmup`` + ``steps`` steps each, so that a machine whose speed drifts (a shared
  host, a GPU's clocks) moves every row alike rather than whichever ran last. A
  row's figures are those of its median round; the JSON keeps every round's.
  With ``profile_steps``, each synthetic row then gets a ``'profile'`` of that many
  traced steps (:func:`profile_step`), written under ``profile_dir`` (kept) or a
  temporary folder (removed).
  """
  entries = []
  for precision in precisions:
    for source in inputs:
      run_config = config.copy_and_resolve_references()
      run_config.model.precision = precision
      if source != 'synthetic':
        run_config.data.in_memory = source == 'in_memory'
      step = Step(run_config, num_examples)
      if source == 'synthetic':
        depths, batches = [None], synthetic_batch(run_config, step.method, step.mesh,
                                                  num_examples)
        first = batches
      else:
        depths = [int(depth) for depth in prefetch]
        batches, _ = real_batches(run_config, step.method, step.mesh)
        first = parallel.host_to_global(
            {k: v for k, v in next(batches).items() if k != 'position'}, step.mesh)
      state = step.init_state()
      row = {'method': run_config.method, 'model': run_config.model.name,
             'width': run_config.model.width, 'image_size': run_config.data.image_size,
             'batch': run_config.global_batch_size, 'precision': precision,
             'remat_stages': list(run_config.model.remat_stages), 'input': source,
             'num_parameters': num_parameters(state)}
      try:
        compiled, row['compile_seconds'], analysis = step.compile(state, first)
      except jax.errors.JaxRuntimeError as error:
        entries.extend(({**row, 'prefetch': depth, 'error': out_of_memory(error)}, None)
                       for depth in depths)
        continue
      row['compiled_bytes'] = compiled_bytes(analysis)
      # The prefetch depths of one input share its step, state and host batches.
      shared = {'compiled': compiled, 'state': state, 'batches': batches, 'mesh': step.mesh}
      entries.extend(({**row, 'prefetch': depth, 'rounds': []}, shared) for depth in depths)
  for _ in range(rounds):
    for row, shared in entries:
      if 'error' in row:      # out of memory: the other rows go on
        continue
      before = peak_device_bytes()
      try:
        shared['state'], figures = time_steps(shared['compiled'], shared['state'],
                                              shared['batches'], shared['mesh'], steps,
                                              warmup, row['prefetch'])
      except jax.errors.JaxRuntimeError as error:
        message = out_of_memory(error)
        for other, others_shared in entries:   # the depths that share its (donated) state
          if others_shared is shared:
            other['error'] = message
        print(_row_line(row), flush=True)
        continue
      row['rounds'].append(figures)
      if len(row['rounds']) == 1:
        peak = peak_device_bytes()
        row['peak_device_bytes'] = peak if peak is not None and peak != before else None
  if profile_steps:
    traces = profile_dir or tempfile.mkdtemp(prefix='step_profile_')
    try:
      for row, shared in entries:
        if row['input'] == 'synthetic' and 'error' not in row:
          shared['state'], row['profile'] = profile_step(
              shared['compiled'], shared['state'], shared['batches'], shared['mesh'],
              profile_steps, os.path.join(traces, row['precision']), profile_top)
          if not profile_dir:
            del row['profile']['trace']
    finally:
      if not profile_dir:
        shutil.rmtree(traces, ignore_errors=True)
  rows = []
  for row, _ in entries:
    if 'error' in row:
      rows.append(row)
    else:
      median = sorted(row['rounds'], key=lambda r: r['step_seconds'])[(rounds - 1) // 2]
      rows.append({**row, **median, 'images_per_second': row['batch'] / median['step_seconds']})
    print(_row_line(rows[-1]), flush=True)
  for row in rows:
    if 'profile' in row:
      print(_profile_lines(row), flush=True)
  return rows


def _profile_lines(row: dict) -> str:
  profile = row['profile']
  title = f'Top ops of {row["precision"]} {row["model"]} at batch {row["batch"]}'
  if 'error' in profile:
    return '\n'.join([f'{title}: {profile["error"]}; the trace holds:', *profile['lines']])
  return (f'{title}, {profile["steps"]} traced steps of {profile["step_ms"]:.1f} ms, '
          f'ops {profile["op_ms_per_step"]:.1f} ms a step:\n{op_profile.table(profile)}')


def _row_line(row: dict) -> str:
  depth = '-' if row['prefetch'] is None else row['prefetch']
  start = (f'{row["method"]:<10}{row["model"]:<10}{row["image_size"]:>5}{row["batch"]:>6} '
           f'{row["precision"]:<10}{row["input"]:<11}{depth:>3}')
  if 'error' in row:
    return f'{start}  {row["error"]}'
  peak = row['peak_device_bytes']
  return (f'{start}{row["compile_seconds"]:>10.1f}{1000 * row["step_seconds"]:>10.1f}'
          f'{row["images_per_second"]:>10.1f}{100 * row["input_wait_fraction"]:>8.1f}%'
          f'{(row["compiled_bytes"] or 0) / GB:>9.2f}'
          f'{"-" if peak is None else f"{peak / GB:.2f}":>9}')


def _torch_line(precision: str, reference: dict) -> str:
  if 'error' in reference:
    return f'PyTorch {precision}: failed: {reference["error"]}'
  how = 'compiled' if reference.get('compiled') else 'eager'
  if reference.get('compile_error'):
    how += f'; torch.compile: {reference["compile_error"]}'
  return (f'PyTorch {precision}: {reference["images_per_second"]:.1f} img/s on '
          f'{reference.get("device_name")} ({how})')


HEADER = (f'{"method":<10}{"model":<10}{"size":>5}{"batch":>6} {"precision":<10}'
          f'{"input":<11}{"pf":>3}{"compile s":>10}{"step ms":>10}{"img/s":>10}'
          f'{"wait":>9}{"XLA GB":>9}{"peak GB":>9}')


def main(argv):
  del argv
  config = FLAGS.config
  references = {}
  if FLAGS.torch and config.method != 'simclr':
    print(f'--torch: the PyTorch reference is SimCLR\'s step, not {config.method}\'s.')
  elif FLAGS.torch:   # first: see torch_reference
    for precision in FLAGS.precisions:
      references[precision] = torch_reference(config, precision, FLAGS.steps, FLAGS.warmup,
                                              FLAGS.torch_flags, FLAGS.torch_seconds)
      print(_torch_line(precision, references[precision]), flush=True)
  print(json.dumps(machine()))
  print(HEADER)
  rows = benchmark(config, FLAGS.precisions, FLAGS.inputs, FLAGS.prefetch, FLAGS.steps,
                   FLAGS.warmup, FLAGS.num_examples, FLAGS.rounds, FLAGS.profile_steps,
                   FLAGS.profile_dir, FLAGS.profile_top)
  torch_rows = []
  for precision, reference in references.items():
    ours = next(r for r in rows if r['precision'] == precision and r['input'] == 'synthetic')
    reference['ratio_ours_to_torch'] = (
        ours['images_per_second'] / reference['images_per_second']
        if 'images_per_second' in reference and 'error' not in ours else None)
    torch_rows.append({'precision': precision, **reference})
    if reference['ratio_ours_to_torch'] is not None:
      print(f'{precision}: ours {ours["images_per_second"]:.1f} img/s, PyTorch '
            f'{reference["images_per_second"]:.1f}: ours / PyTorch = '
            f'{reference["ratio_ours_to_torch"]:.2f} (parameters: ours '
            f'{ours["num_parameters"]}, PyTorch {reference.get("num_parameters")})')
  if FLAGS.json:
    with open(FLAGS.json, 'w') as f:
      json.dump({'machine': machine(), 'config': config.to_dict(), 'rows': rows,
                 'torch': torch_rows}, f, indent=2, default=str)


if __name__ == '__main__':
  config_flags.DEFINE_config_file('config', None, 'experiment config', lock_config=True)
  flags.DEFINE_list('precisions', ['float32'], 'model.precision values, one row each')
  flags.DEFINE_list('inputs', ['synthetic'], 'synthetic, in_memory, streamed')
  flags.DEFINE_list('prefetch', ['0', '2'], 'input-stage depths for the real inputs')
  flags.DEFINE_integer('steps', 10, 'timed steps')
  flags.DEFINE_integer('warmup', 2, 'untimed steps before each round')
  flags.DEFINE_integer('rounds', 1, 'turns the rows take, each of --steps timed steps; '
                       'a row reports its median round')
  flags.DEFINE_integer('num_examples', 50000, 'training-set size a synthetic run assumes '
                       '(memory bank and classifier rows)')
  flags.DEFINE_bool('torch', False, 'also time benchmarks/torch_reference.py (SimCLR)')
  flags.DEFINE_list('torch_flags', [], 'extra flags for it (on a GPU --channels_last and '
                    '--compile are always given)')
  flags.DEFINE_float('torch_seconds', 300, 'time allowed each PyTorch run; torch.compile '
                     'gets half of it, and eager mode is timed where it takes longer')
  flags.DEFINE_integer('profile_steps', 0, 'steps of each synthetic row traced for its '
                       'top ops (0: none)')
  flags.DEFINE_string('profile_dir', '', 'keep the traces here (for TensorBoard)')
  flags.DEFINE_integer('profile_top', 15, 'ops listed per profile')
  flags.DEFINE_string('json', '', 'write every figure here')
  app.run(main)

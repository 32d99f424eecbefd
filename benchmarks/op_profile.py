"""Where a compiled step spends its time: the XLA ops of a traced run, by time.

:func:`trace` runs a few steps under ``jax.profiler`` and :func:`top_ops` reads
the trace back with ``jax.profiler.ProfileData`` (no TensorBoard or xprof
needed) and joins each op's time to what the compiled HLO says the op is: its
opcode, what a fusion computes (a convolution, a matmul, a reduction, ...) and the
JAX operation it came from (``op_name`` metadata, which says forward or backward
and which layer). The step benchmark prints it with ``--profile_steps``.

On a GPU or TPU the ops' times are the device's kernel times; on the CPU they are
the runtime's per-op (thunk) times, summed over its threads, so their total can
exceed the step's wall time.
"""

from __future__ import annotations

import collections
import glob
import os
import re

import jax

# Ops that only run others (a loop, a branch, a call): their bodies' ops are
# traced on their own, so counting the container would count the time twice.
_CONTAINERS = frozenset({'while', 'conditional', 'call', 'async-start', 'async-done'})
# What a fusion is named for, most telling first: its category and the opcodes.
_CATEGORIES = (
    ('convolution', ('convolution',)),
    ('matmul', ('dot',)),
    ('collective', ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all',
                    'collective-permute', 'all-reduce-start', 'all-gather-start')),
    ('reduction', ('reduce', 'reduce-window', 'select-and-scatter', 'scatter', 'sort')),
    ('gather', ('gather', 'dynamic-slice', 'dynamic-update-slice')),
    ('layout', ('transpose', 'copy', 'copy-start')),
)
# Custom calls by their target: cuDNN convolutions, cuBLAS matmuls, and the rest.
_CUSTOM_TARGETS = (('convolution', ('conv',)), ('matmul', ('gemm', 'matmul', 'cublas')))
# Lines a GPU trace derives from the kernels: 'XLA Ops' names each op once, where
# the stream lines hold its kernels (one op may launch several).
_OPS_LINE = 'XLA Ops'
_COMPUTATION = re.compile(r'^(?:ENTRY )?%?([\w.\-]+) \(')
_INSTRUCTION = re.compile(r'^\s+(?:ROOT )?%?([\w.\-]+) = (.*)$')
_OPCODE = re.compile(r'(?<![\w.\-%])([a-z][a-z0-9\-]*)\(')
_CALLS = re.compile(r'\b(?:calls|to_apply|body)=%?([\w.\-]+)')
_TARGET = re.compile(r'custom_call_target="([^"]*)"')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_ANNOTATED_OP = re.compile(r'hlo_op=([^,#]+)')
_ANNOTATED_MODULE = re.compile(r'hlo_module=([^,#]+)')


def trace(run_steps, log_dir: str) -> str:
  """Calls ``run_steps()`` (which should block until its steps are done) under the
  profiler; returns the path of the trace it wrote (``*.xplane.pb``, which
  TensorBoard's profile plugin also reads; :func:`load` reads it here)."""
  before = set(glob.glob(os.path.join(log_dir, '**', '*.xplane.pb'), recursive=True))
  with jax.profiler.trace(log_dir):
    run_steps()
  written = set(glob.glob(os.path.join(log_dir, '**', '*.xplane.pb'), recursive=True)) - before
  if not written:
    raise RuntimeError(f'jax.profiler.trace wrote no *.xplane.pb under {log_dir}.')
  return max(written, key=os.path.getmtime)


def load(xplane_path: str):
  """A trace written by :func:`trace`, as ``jax.profiler.ProfileData``."""
  return jax.profiler.ProfileData.from_file(xplane_path)


def describe_ops(hlo_text: str) -> dict[str, dict]:
  """Every instruction of a compiled module's HLO text (``compiled.as_text()``), by
  name: ``{'opcode', 'category', 'computes' (the opcodes that name its category,
  a fusion's included), 'source' (the JAX op it came from, '' if unknown)}``."""
  instructions, computations, current = {}, collections.defaultdict(list), None
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header and line.rstrip().endswith('{'):
      current = header.group(1)
      continue
    instruction = _INSTRUCTION.match(line)
    if not instruction or current is None:
      continue
    name, rest = instruction.groups()
    opcode = _OPCODE.search(rest)
    target, op_name = _TARGET.search(rest), _OP_NAME.search(rest)
    instructions[name] = {
        'opcode': opcode.group(1) if opcode else '?',
        'target': target.group(1) if target else '',
        'calls': _CALLS.findall(rest),
        'source': op_name.group(1) if op_name else ''}
    computations[current].append(name)

  def body(name, seen):
    """The instructions an instruction runs: itself and, for a fusion or a custom
    call with a body, those of the computations it calls."""
    found = [name]
    for called in instructions[name]['calls']:
      if called not in seen:
        seen.add(called)
        for inner in computations.get(called, ()):
          found.extend(body(inner, seen))
    return found

  described = {}
  for name, instruction in instructions.items():
    inner = [instructions[i] for i in body(name, set())]
    category, computes = _category(inner)
    source = next((i['source'] for i in inner if i['source'] and
                   (i['opcode'] in computes or i['target'] in computes)),
                  next((i['source'] for i in inner if i['source']), ''))
    described[name] = {'opcode': instruction['opcode'], 'category': category,
                       'computes': computes, 'source': source}
  return described


def _category(inner: list[dict]) -> tuple[str, list[str]]:
  """(category, the opcodes or custom-call targets that name it) of the
  instructions an op runs."""
  targets = sorted({i['target'] for i in inner if i['target']})
  for target in targets:
    for category, words in _CUSTOM_TARGETS:
      if any(word in target.lower() for word in words):
        return category, [target]
  opcodes = {i['opcode'] for i in inner}
  for category, names in _CATEGORIES:
    found = sorted(opcodes.intersection(names))
    if found:
      return category, found
  return ('custom-call', targets) if targets else ('elementwise', [])


def op_times(data, module: str) -> dict[str, dict]:
  """``{op: {'ns': total time, 'count': events}}`` of ``module``'s ops in a trace
  (a ``jax.profiler.ProfileData``).

  Device planes (GPU, TPU) are read when they hold any op, else the host's (the
  CPU backend runs its ops there). An event names its op and module in its
  'hlo_op' and 'hlo_module' stats or, for a GPU kernel, in its 'annotation' (XLA's
  ``...hlo_module=M...::Thunk:#...hlo_op=OP#``); a kernel is counted as part of
  its op. A plane with an 'XLA Ops' line (a trace already post-processed) is read
  from that line alone, which lists each op once.
  """
  found = {'device': collections.defaultdict(lambda: {'ns': 0.0, 'count': 0}),
           'host': collections.defaultdict(lambda: {'ns': 0.0, 'count': 0})}
  for plane in data.planes:
    where = 'device' if plane.name.startswith('/device:') else 'host'
    lines = list(plane.lines)
    if any(line.name == _OPS_LINE for line in lines):
      lines = [line for line in lines if line.name == _OPS_LINE]
    for line in lines:
      for event in line.events:
        op, op_module = _event_op(event, line.name == _OPS_LINE)
        if op is None or (op_module or module) != module:
          continue
        found[where][op]['ns'] += event.duration_ns
        found[where][op]['count'] += 1
  return dict(found['device'] or found['host'])


def _event_op(event, on_ops_line: bool) -> tuple[str | None, str | None]:
  """(op, module) an event belongs to; None for either that it does not say."""
  stats = dict(event.stats)
  annotation = str(stats.get('annotation', ''))
  ops = _ANNOTATED_OP.findall(annotation)
  modules = _ANNOTATED_MODULE.findall(annotation)
  op = stats.get('hlo_op') or (ops[-1] if ops else None)
  if op is None and on_ops_line:
    op = event.name
  return op, stats.get('hlo_module') or (modules[-1] if modules else None)


def trace_summary(data) -> list[str]:
  """Each plane and line of a trace with its event count: what to look at when
  :func:`op_times` finds no op (a backend whose traces are laid out otherwise)."""
  return [f'{plane.name} / {line.name}: {sum(1 for _ in line.events)} events'
          for plane in data.planes for line in plane.lines]


def top_ops(times: dict[str, dict], described: dict[str, dict], steps: int,
            top: int) -> dict:
  """The ``top`` ops by time and the time by category, per step.

  Returns ``{'op_ms_per_step', 'ops': [{'op', 'ms_per_step', 'share', 'calls_per_step',
  'opcode', 'category', 'computes', 'source'}], 'categories': {category: {'ms_per_step',
  'share'}}}``; shares are of the ops' total, container ops (loops, calls) left out.
  """
  unknown = {'opcode': '?', 'category': 'unknown', 'computes': [], 'source': ''}
  rows = []
  for op, time in times.items():
    what = described.get(op, unknown)
    if what['opcode'] in _CONTAINERS:
      continue
    rows.append({'op': op, 'ms_per_step': time['ns'] / 1e6 / steps,
                 'calls_per_step': time['count'] / steps, **what})
  total = sum(row['ms_per_step'] for row in rows)
  rows.sort(key=lambda row: -row['ms_per_step'])
  categories = collections.defaultdict(float)
  for row in rows:
    row['share'] = row['ms_per_step'] / total if total else 0.0
    categories[row['category']] += row['ms_per_step']
  return {'op_ms_per_step': total, 'ops': rows[:top],
          'categories': {name: {'ms_per_step': ms, 'share': ms / total if total else 0.0}
                         for name, ms in sorted(categories.items(), key=lambda kv: -kv[1])}}


def module_name(hlo_text: str) -> str:
  """The name the trace gives a compiled module's ops (its HLO module's)."""
  first = hlo_text.split('\n', 1)[0]
  if not first.startswith('HloModule '):
    raise ValueError(f'Not an HLO module text: {first[:80]!r}')
  return first.split()[1].rstrip(',')


def table(profile: dict) -> str:
  """The top ops and the categories as text."""
  lines = [f'{"op":<34}{"ms/step":>9}{"share":>7}{"calls":>6}  {"category":<12}'
           f'{"computes":<24}source']
  for row in profile['ops']:
    source = row['source'].removeprefix('jit(train_step)/')
    lines.append(f'{row["op"][:33]:<34}{row["ms_per_step"]:>9.2f}{100 * row["share"]:>6.1f}%'
                 f'{row["calls_per_step"]:>6.0f}  {row["category"]:<12}'
                 f'{",".join(row["computes"])[:23]:<24}{source[-90:]}')
  lines.append('by category: ' + ', '.join(
      f'{name} {figures["ms_per_step"]:.2f} ms ({100 * figures["share"]:.0f}%)'
      for name, figures in profile['categories'].items()))
  return '\n'.join(lines)

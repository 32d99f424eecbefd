"""The step benchmark times the trainer's step on each input through the trainer's
input stage, reports each row's median round, goes on past a row that runs out of
device memory and profiles the step's ops; the cost benchmark keeps a row that
runs out of device memory, traces alone give its saved activations, and its CPC
comparison's memory per device is the formula it prints."""

import jax
import numpy as np
import pytest

from benchmarks import step as step_benchmark


def test_step_benchmark_rows_take_turns_and_report_their_median_round(config):
  config.data.in_memory = True
  steps, rounds = 2, 3
  rows = step_benchmark.benchmark(config, ['float32'], ['synthetic', 'in_memory'], ['0', '2'],
                                  steps=steps, warmup=1, num_examples=640, rounds=rounds)
  assert [(row['input'], row['prefetch']) for row in rows] == [
      ('synthetic', None), ('in_memory', 0), ('in_memory', 2)]
  for row in rows:
    assert len(row['rounds']) == rounds
    seconds = sorted(r['step_seconds'] for r in row['rounds'])
    assert row['step_seconds'] == seconds[(rounds - 1) // 2]
    assert row['images_per_second'] == config.global_batch_size / row['step_seconds']
    assert 0 <= row['input_wait_fraction'] < 1 and np.isfinite(row['loss'])
    assert row['num_parameters'] > 0 and row['compile_seconds'] > 0


def test_a_step_row_out_of_memory_is_reported_and_the_other_rows_go_on(config, monkeypatch):
  """A float32 row that does not fit must not cost the bfloat16 figures of the
  same run: the row, and the prefetch depths sharing its donated state, say OOM."""
  config.data.in_memory = True
  real_time_steps = step_benchmark.time_steps

  def time_steps(compiled, state, batches, mesh, steps, warmup, prefetch):
    if prefetch == 0:
      raise jax.errors.JaxRuntimeError('RESOURCE_EXHAUSTED: Out of memory while trying '
                                       'to allocate 81.00GiB.')
    return real_time_steps(compiled, state, batches, mesh, steps, warmup, prefetch)

  monkeypatch.setattr(step_benchmark, 'time_steps', time_steps)
  rows = step_benchmark.benchmark(config, ['float32'], ['synthetic', 'in_memory'], ['0', '2'],
                                  steps=1, warmup=1, num_examples=640, rounds=2)
  synthetic, *in_memory = rows
  assert len(synthetic['rounds']) == 2 and synthetic['images_per_second'] > 0
  for row in in_memory:
    assert row['error'] == ('out of memory: RESOURCE_EXHAUSTED: Out of memory while trying '
                            'to allocate 81.00GiB.')
    assert 'images_per_second' not in row and row['compile_seconds'] > 0
  assert step_benchmark._row_line(in_memory[1]).endswith(in_memory[1]['error'])  # pylint: disable=protected-access

  def broken(*args, **kwargs):
    raise jax.errors.JaxRuntimeError('INTERNAL: something else')

  monkeypatch.setattr(step_benchmark, 'time_steps', broken)
  with pytest.raises(jax.errors.JaxRuntimeError, match='something else'):
    step_benchmark.benchmark(config, ['float32'], ['synthetic'], [], steps=1, warmup=1,
                             num_examples=640, rounds=1)


def test_step_profile_lists_the_steps_own_ops_by_time(config):
  """A traced CPU step: its ops are found, are instructions of the compiled step,
  and come sorted; a ResNet step spends time in convolutions."""
  rows = step_benchmark.benchmark(config, ['float32'], ['synthetic'], [], steps=1, warmup=1,
                                  num_examples=640, rounds=1, profile_steps=2, profile_top=10)
  profile = rows[0]['profile']
  assert 'error' not in profile, profile
  assert profile['steps'] == 2 and profile['step_ms'] > 0 and 'trace' not in profile
  ops = profile['ops']
  assert len(ops) == 10
  times = [op['ms_per_step'] for op in ops]
  assert times == sorted(times, reverse=True) and times[-1] > 0
  assert all(op['category'] != 'unknown' for op in ops), ops
  assert sum(op['share'] for op in ops) <= 1 + 1e-9
  categories = profile['categories']
  assert sum(c['ms_per_step'] for c in categories.values()) == pytest.approx(
      profile['op_ms_per_step'])
  assert categories['convolution']['ms_per_step'] > 0


def test_cost_row_of_a_step_that_does_not_fit_keeps_its_compiled_figures(config, monkeypatch):
  """Out of device memory is the figure a no-remat row at a large batch exists to
  show: its row says OOM and keeps what compiling measured."""
  from benchmarks import cost  # pylint: disable=import-outside-toplevel

  def out_of_memory(*args, **kwargs):
    raise jax.errors.JaxRuntimeError('RESOURCE_EXHAUSTED: Out of memory while trying to '
                                     'allocate 151.20GiB.')

  monkeypatch.setattr(step_benchmark, 'time_steps', out_of_memory)
  row = cost.measure(config, 'SimCLR, no remat', run=True, steps=1)
  assert row['error'] == ('out of memory: RESOURCE_EXHAUSTED: Out of memory while trying to '
                          'allocate 151.20GiB.')
  assert row['step_seconds'] is None
  assert row['compiled_bytes'] > 0 and row['saved_activation_bytes'] > 0
  assert cost._line(row).split()[5] == 'OOM'   # pylint: disable=protected-access


def test_cost_activations_only_traces_what_each_variant_keeps(config):
  """--activations_only: no compile, and the saved activations say what the MoCo v2
  paper says (end to end back-propagates through both views: twice MoCo's one
  view of queries) and what remat is for (it keeps a fraction)."""
  from benchmarks import cost  # pylint: disable=import-outside-toplevel
  rows = {}
  for name, method, remat in [('end to end', 'simclr', ()), ('moco', 'moco', ()),
                              ('remat', 'simclr', (1, 2, 3, 4))]:
    variant = config.copy_and_resolve_references()
    variant.method, variant.model.remat_stages = method, remat
    variant.moco.queue_size = 64    # its logits would outweigh this tiny network's activations
    rows[name] = cost.measure(variant, name, run=False, steps=1, compile_step=False)
  for row in rows.values():
    assert row['compiled_bytes'] is None and row['compile_seconds'] is None
    assert row['saved_activation_bytes'] > 0
  ratio = rows['end to end']['saved_activation_bytes'] / rows['moco']['saved_activation_bytes']
  assert 1.9 < ratio < 2.1, ratio
  assert rows['remat']['saved_activation_bytes'] < (
      0.5 * rows['end to end']['saved_activation_bytes'])
  assert cost._line(rows['remat']).split()[-1] == (  # pylint: disable=protected-access
      f'{rows["remat"]["saved_activation_bytes"] / cost.GB:.2f}')


def test_cost_cpc_comparison_reports_ratios_and_the_memory_per_device(config):
  """--compare=cpc, traced only: a CPC v2 grid of patches keeps more activations
  an image than SimCLR's two views; the memory of a larger run is the formula
  b x A + P + P + S, with Adam's two moments as S, and the step traced at that
  batch keeps at least the extrapolation (the loss scores every query of the
  global batch)."""
  from benchmarks import cost  # pylint: disable=import-outside-toplevel
  cpc = config.copy_and_resolve_references()
  cpc.method, cpc.model.norm, cpc.optim.name = 'cpc', 'layer', 'adamw'
  cpc.cpc.patch_size, cpc.cpc.patch_stride = 4, 2       # 16 px: a 7 x 7 grid
  cpc.cpc.target_dim = cpc.cpc.context_channels = 8
  cpc.cpc.context_blocks = 2
  rows = []
  for name, variant, batch, remat in [
      ('SimCLR', config, 16, ()), ('SimCLR, remat', config, 16, cost.REMAT_ALL),
      ('CPC v2', cpc, 16, ()), ('CPC v2, remat', cpc, 16, cost.REMAT_ALL),
      ('CPC v2, 8 x 4', cpc, 32, ()), ('CPC v2, remat, 8 x 4', cpc, 32, cost.REMAT_ALL)]:
    variant = variant.copy_and_resolve_references()
    variant.global_batch_size, variant.model.remat_stages = batch, remat
    rows.append(cost.measure(variant, name, run=False, steps=1, compile_step=False))
  assert [row['devices'] for row in rows] == [8] * 6
  memory = cost.cpc_memory(rows, per_device=4)
  assert [(m['remat'], m['activations']) for m in memory] == [
      (False, 'extrapolated'), (False, 'traced'), (True, 'extrapolated'), (True, 'traced')]
  for estimate, small, full in zip(memory[::2], rows[2:4], rows[4:]):
    per_image = small['saved_activation_bytes'] / 2        # 2 images a device
    assert estimate['activation_bytes'] == 4 * per_image
    assert full['saved_activation_bytes'] > 4 * per_image
  for estimate in memory:
    params = estimate['param_bytes']
    assert estimate['gradient_bytes'] == params
    assert 2 * params <= estimate['opt_state_bytes'] < 2 * params + 64   # Adam: mu, nu, count
    assert estimate['total_bytes'] == (estimate['activation_bytes'] + 2 * params
                                       + estimate['opt_state_bytes'])
  lines = cost._cpc_lines(rows, memory)    # pylint: disable=protected-access
  simclr_per_image = rows[0]['saved_activation_bytes'] / 2
  assert lines[2].split()[-2:] == [f'{simclr_per_image / cost.MB:.1f}', '1.00']
  assert lines[4].split()[-1] == f'{rows[2]["saved_activation_bytes"] / 2 / simclr_per_image:.2f}'
  assert float(lines[4].split()[-1]) > 1
  assert lines[-1].startswith('(A: saved activations per image')

"""The step benchmark times the trainer's step on each input through the trainer's
input stage, and reports each row's median round."""

import numpy as np

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

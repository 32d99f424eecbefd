"""The op profile joins a trace's op times to what the compiled HLO says each op is.

The GPU layouts (kernels named by their annotation, a post-processed 'XLA Ops'
line) are built as text protos here, since the suite runs on a CPU; the CPU's own
trace is read in test_benchmarks.py.
"""

import jax
import pytest

from benchmarks import op_profile

# A module in the optimized HLO text's form, with the ops a GPU step is made of.
HLO = """HloModule jit_step, is_scheduled=true, entry_computation_layout={()->f32[]}

%fused_reduce (param_0: f32[8,4]) -> f32[8] {
  %param_0 = f32[8,4]{1,0} parameter(0)
  %constant = f32[] constant(0)
  ROOT %reduce.1 = f32[8]{0} reduce(%param_0, %constant), dimensions={1}, to_apply=%add, metadata={op_name="jit(step)/jvp(Model)/BatchNorm_0/reduce_sum"}
}

%fused_transpose (param_0.1: f32[8,4]) -> f32[4,8] {
  %param_0.1 = f32[8,4]{1,0} parameter(0)
  ROOT %transpose.1 = f32[4,8]{0,1} transpose(%param_0.1), dimensions={1,0}
}

%body (state: (s32[], f32[8,4])) -> (s32[], f32[8,4]) {
  %state = (s32[], f32[8,4]{1,0}) parameter(0)
  ROOT %tuple.2 = (s32[], f32[8,4]{1,0}) tuple(%state)
}

ENTRY %main (x: f32[8,4], w: f32[3,3,4,4]) -> f32[] {
  %x = f32[8,4]{1,0} parameter(0)
  %w = f32[3,3,4,4]{3,2,1,0} parameter(1)
  %custom-call.3 = (f32[8,8,8,4]{3,2,1,0}, u8[0]{0}) custom-call(%x, %w), custom_call_target="__cudnn$convBackwardFilter", metadata={op_name="jit(step)/transpose(jvp(Model))/Conv_0/conv_general_dilated"}
  %custom-call.4 = f32[8,8]{1,0} custom-call(%x, %x), custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(step)/jvp(Model)/Dense_0/dot_general"}
  %loop_reduce_fusion = f32[8]{0} fusion(%x), kind=kInput, calls=%fused_reduce
  %transpose_fusion = f32[4,8]{0,1} fusion(%x), kind=kLoop, calls=%fused_transpose
  %while.5 = (s32[], f32[8,4]{1,0}) while(%tuple.1), condition=%cond, body=%body
  ROOT %add.6 = f32[] add(%c, %c), metadata={op_name="jit(step)/add"}
}
"""


def test_each_op_is_described_by_what_it_computes_and_where_it_came_from():
  described = op_profile.describe_ops(HLO)
  assert op_profile.module_name(HLO) == 'jit_step'
  conv = described['custom-call.3']
  assert (conv['category'], conv['computes']) == ('convolution', ['__cudnn$convBackwardFilter'])
  assert conv['source'].endswith('transpose(jvp(Model))/Conv_0/conv_general_dilated')
  assert described['custom-call.4']['category'] == 'matmul'
  # A fusion is named for its body, and takes the source of the op that names it.
  reduce = described['loop_reduce_fusion']
  assert (reduce['opcode'], reduce['category'], reduce['computes']) == (
      'fusion', 'reduction', ['reduce'])
  assert reduce['source'] == 'jit(step)/jvp(Model)/BatchNorm_0/reduce_sum'
  assert described['transpose_fusion']['category'] == 'layout'
  assert described['while.5']['opcode'] == 'while'
  assert described['add.6']['category'] == 'elementwise'


def _plane(name, lines, stat_names):
  """A text-proto XPlane: ``lines`` is [(line name, [(event name, duration in ns,
  {stat: value})])]."""
  event_ids, stat_ids = {}, {name: i + 1 for i, name in enumerate(stat_names)}
  body = []
  for line_id, (line_name, events) in enumerate(lines, 1):
    parts = []
    for event_name, duration_ns, stats in events:
      event_id = event_ids.setdefault(event_name, len(event_ids) + 1)
      stat_text = ' '.join(f'stats {{ metadata_id: {stat_ids[k]} str_value: "{v}" }}'
                           for k, v in stats.items())
      parts.append(f'events {{ metadata_id: {event_id} offset_ps: 0 '
                   f'duration_ps: {duration_ns * 1000} {stat_text} }}')
    body.append(f'lines {{ id: {line_id} name: "{line_name}" {" ".join(parts)} }}')
  body += [f'event_metadata {{ key: {i} value {{ id: {i} name: "{n}" }} }}'
           for n, i in event_ids.items()]
  body += [f'stat_metadata {{ key: {i} value {{ id: {i} name: "{n}" }} }}'
           for n, i in stat_ids.items()]
  return f'planes {{ name: "{name}" {" ".join(body)} }}'


def _kernel(op, module='jit_step'):
  return {'annotation': f'XlaModule:#prefix=jit(step),hlo_module={module},program_id=3#'
                        f'::Thunk:#name=Conv_0,hlo_op={op}#'}


def test_gpu_kernels_count_for_their_op_and_the_device_plane_wins_over_the_host():
  device = _plane('/device:GPU:0', [('Stream #13(compute)', [
      ('cudnn_wgrad_kernel', 300, _kernel('custom-call.3')),
      ('cudnn_wgrad_reduce', 100, _kernel('custom-call.3')),   # a second kernel of the op
      ('triton_reduce', 50, _kernel('loop_reduce_fusion')),
      ('other_module_kernel', 999, _kernel('fusion.9', module='jit_init'))])],
      ['annotation'])
  # The host's launch events also carry the op: counted only without a device plane.
  host = _plane('/host:CPU', [('tf_XLAPjRtGpuClient', [
      ('custom-call.3', 7, {'hlo_op': 'custom-call.3', 'hlo_module': 'jit_step'})])],
      ['hlo_op', 'hlo_module'])
  trace = jax.profiler.ProfileData.from_text_proto(device + host)
  times = op_profile.op_times(trace, 'jit_step')
  assert times == {'custom-call.3': {'ns': 400.0, 'count': 2},
                   'loop_reduce_fusion': {'ns': 50.0, 'count': 1}}
  host_only = jax.profiler.ProfileData.from_text_proto(host)
  assert op_profile.op_times(host_only, 'jit_step') == {'custom-call.3': {'ns': 7.0, 'count': 1}}


def test_a_post_processed_trace_is_read_from_its_xla_ops_line_alone():
  device = _plane('/device:GPU:0', [
      ('Stream #13(compute)', [('kernel_a', 30, _kernel('custom-call.4')),
                               ('kernel_b', 20, _kernel('custom-call.4'))]),
      ('XLA Ops', [('custom-call.4', 55, {})])], ['annotation'])
  trace = jax.profiler.ProfileData.from_text_proto(device)
  assert op_profile.op_times(trace, 'jit_step') == {'custom-call.4': {'ns': 55.0, 'count': 1}}


def test_top_ops_are_per_step_shares_of_the_ops_total_without_containers():
  times = {'custom-call.3': {'ns': 6e6, 'count': 2}, 'custom-call.4': {'ns': 2e6, 'count': 2},
           'transpose_fusion': {'ns': 2e6, 'count': 4}, 'while.5': {'ns': 9e6, 'count': 2},
           'not.in.hlo': {'ns': 0.0, 'count': 2}}
  profile = op_profile.top_ops(times, op_profile.describe_ops(HLO), steps=2, top=2)
  assert [row['op'] for row in profile['ops']] == ['custom-call.3', 'custom-call.4']
  first = profile['ops'][0]
  assert first['ms_per_step'] == pytest.approx(3.0) and first['calls_per_step'] == 1
  assert first['share'] == pytest.approx(0.6)   # the loop's 9 ms are its body's, not counted
  assert profile['op_ms_per_step'] == pytest.approx(5.0)
  assert profile['categories']['layout'] == {'ms_per_step': pytest.approx(1.0),
                                             'share': pytest.approx(0.2)}
  assert profile['categories']['unknown']['ms_per_step'] == 0
  assert 'custom-call.3' in op_profile.table(profile)

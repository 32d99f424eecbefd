"""Signals in every phase: where nothing is unsaved (before the first step, after
the final save) a signal stops the process at once, and a second signal always
does, even while the main thread is inside a call that never returns to Python
(XLA compiling, a read that blocks). The first signal during training saves the
step in flight (tests/test_robustness.py)."""

import signal
import subprocess
import sys
import time

import pytest

_SCRIPT = """
import os, signal, sys
from contrastive import loop
phase = sys.argv[1]
with loop.Preemption() as preemption:
  preemption.stepping = phase != 'starting'
  preemption.finished = phase == 'finished'
  print('ready', flush=True)
  read, _ = os.pipe()
  os.read(read, 1)       # blocks for ever: no step will notice a signal
print('the blocking call returned', flush=True)
"""


def _signalled(phase: str, signals):
  child = subprocess.Popen([sys.executable, '-c', _SCRIPT, phase], text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  assert child.stdout.readline() == 'ready\n'
  started = time.monotonic()
  for number in signals:
    child.send_signal(number)
    time.sleep(0.3)
  status = child.wait(timeout=30)
  return status, child.stderr.read(), time.monotonic() - started


@pytest.mark.parametrize('phase,message', [
    ('starting', 'Stopped by SIGTERM before this run took a step: nothing new to save'),
    ('finished', 'Stopped by SIGTERM after training ended (its checkpoints are complete)')])
def test_one_signal_stops_at_once_where_nothing_is_unsaved(phase, message):
  status, stderr, seconds = _signalled(phase, [signal.SIGTERM])
  assert status == 0 and message in stderr, stderr
  assert seconds < 10


def test_a_second_ctrl_c_stops_at_once_while_training():
  status, stderr, seconds = _signalled('training', [signal.SIGINT, signal.SIGINT])
  assert status == 130, stderr
  assert 'SIGINT again: stopped at once, without saving the step in flight' in stderr
  assert 'Traceback' not in stderr and seconds < 10

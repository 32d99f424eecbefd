r"""Kills a training run at random moments and checks that resuming loses nothing.

    python scripts/fault_injection.py --workdir=/tmp/faults --trials=10

Trains the quickstart (or ``--config``) once without interruption (kept for the
next call with the same command), then again under fire: each trial starts the
same ``python -m contrastive.main`` command, lets it train for a random time
after its first step, sends SIGTERM (a preemption: the run must save the step in
flight and exit 0) or SIGKILL (a crash, during a save too: the run must resume
from its newest complete checkpoint), and starts it again; the interrupted runs
checkpoint every ``--checkpoint_every_steps`` steps, so that kills fall between
checkpoints and during saves. Then a full disk: the run continues in a small
tmpfs (where this machine lets the script mount one; skipped with the reason
otherwise) that is filled while it trains; it must stop at once with one line
naming the cause, and its workdir, copied back, must resume. After the last
trial the run goes to the end. Every step's loss and the final parameters must equal
the uninterrupted run's. Prints one line per trial and a verdict; exits 1 on any
difference. Not part of the test suite: it takes minutes.
"""

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def command(config: str, workdir: str, overrides: list[str]) -> list[str]:
  return [sys.executable, '-m', 'contrastive.main', f'--config={config}',
          f'--workdir={workdir}', *overrides]


def losses(workdir: str) -> dict[int, float]:
  """Each step's loss; a step written again after a resume keeps its last value."""
  records = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      record = json.loads(line)
      if 'loss' in record:
        records[record['step']] = record['loss']
  return records


def final_params(workdir: str):
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  directory = os.path.join(workdir, 'checkpoints')
  step = max(int(name) for name in os.listdir(directory) if name.isdigit())
  state = ocp.StandardCheckpointer().restore(os.path.join(directory, str(step), 'default'))
  return step, state['params']


def full_disk(args, faulty: str, env: dict, rng: random.Random) -> None:
  """The run's workdir on a 512 MB tmpfs, filled up a random time into training:
  the run must stop with a one-line error naming the full disk (exit 1, no
  traceback); the workdir it leaves is copied back for the final resume."""
  disk = os.path.join(args.workdir, 'small_disk')
  os.makedirs(disk, exist_ok=True)
  mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=512m', 'tmpfs', disk],
                           capture_output=True, text=True, check=False)
  if mounted.returncode:
    print(f'full disk: skipped, no tmpfs can be mounted here '
          f'({mounted.stderr.strip() or "not permitted"})', flush=True)
    return
  try:
    workdir = os.path.join(disk, 'faulty')
    if os.path.isdir(faulty):
      shutil.copytree(faulty, workdir)
    child = subprocess.Popen(
        command(args.config, workdir, args.overrides + [
            f'--config.checkpoint_every_steps={args.checkpoint_every_steps}']),
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in child.stdout:
      lines.append(line)
      if line.startswith('First step'):
        break
    time.sleep(rng.uniform(0.0, args.max_wait / 2))
    with open(os.path.join(disk, 'filler'), 'wb') as filler:
      try:
        while True:
          filler.write(b'\0' * (1 << 20))
          filler.flush()
      except OSError:
        pass
    filled = time.perf_counter()
    lines += child.stdout.readlines()
    child.wait()
    stopped_after = time.perf_counter() - filled
    errors = [line for line in lines if line.startswith('error: ')]
    print(f'full disk: exit {child.returncode} {stopped_after:.1f} s after the disk filled; '
          f'{errors[0].strip() if errors else "no error line"}', flush=True)
    if (child.returncode != 1 or not errors or 'no space left' not in errors[0]
        or any('Traceback' in line for line in lines)):
      print(''.join(lines[-40:]))
      sys.exit('full disk: the run must stop with one line naming the full disk.')
    os.remove(os.path.join(disk, 'filler'))
    shutil.rmtree(faulty, ignore_errors=True)
    shutil.copytree(workdir, faulty)
  finally:
    subprocess.run(['umount', '-l', disk], check=False)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', required=True, help='Scratch folder (emptied first).')
  parser.add_argument('--config', default='configs/quickstart.py')
  parser.add_argument('--trials', type=int, default=10)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--checkpoint_every_steps', type=int, default=10,
                      help='The interrupted runs\' checkpoint cadence (more often than '
                           'the config\'s, so that kills fall between checkpoints).')
  parser.add_argument('--max_wait', type=float, default=60.0,
                      help='Longest training time before a signal, in seconds after '
                           'the first step.')
  parser.add_argument('overrides', nargs='*', help='--config.* overrides for both runs.')
  args = parser.parse_args()
  rng = random.Random(args.seed)
  straight, faulty = (os.path.join(args.workdir, name) for name in ('straight', 'faulty'))
  shutil.rmtree(faulty, ignore_errors=True)
  env = dict(os.environ, PYTHONPATH=REPO)

  record = os.path.join(args.workdir, 'straight_command.json')
  wanted = command(args.config, straight, args.overrides)
  if not (os.path.exists(record) and json.load(open(record)) == wanted):
    shutil.rmtree(straight, ignore_errors=True)
    started = time.perf_counter()
    subprocess.run(wanted, check=True, cwd=REPO, env=env, stdout=subprocess.DEVNULL)
    print(f'uninterrupted run: {time.perf_counter() - started:.0f} s', flush=True)
    with open(record, 'w') as f:
      json.dump(wanted, f)

  faulty_command = command(args.config, faulty, args.overrides + [
      f'--config.checkpoint_every_steps={args.checkpoint_every_steps}'])
  for trial in range(1, args.trials + 1):
    kind = rng.choice([signal.SIGTERM, signal.SIGKILL])
    wait = rng.uniform(0.0, args.max_wait)
    child = subprocess.Popen(faulty_command, cwd=REPO,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    lines, training = [], threading.Event()

    def read(child=child, lines=lines, training=training):
      for line in child.stdout:
        lines.append(line)
        if line.startswith('First step'):
          training.set()
      training.set()                       # the run ended before its first step

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    training.wait()
    try:
      child.wait(timeout=wait)
      outcome = 'finished before the signal'
    except subprocess.TimeoutExpired:
      child.send_signal(kind)
      child.wait()
      outcome = f'{kind.name} {wait:.1f} s into training'
    reader.join()
    output = ''.join(lines)
    resumed = [line for line in output.splitlines() if line.startswith('Resuming from')]
    last = [line for line in output.splitlines() if line.startswith('step ')]
    print(f'trial {trial:2d}: {outcome}; exit {child.returncode}; '
          f'{resumed[0].split(" in ")[0] if resumed else "fresh start"}; '
          f'last step line: {last[-1].split("  ")[0] if last else "-"}', flush=True)
    if kind == signal.SIGTERM and 'finished' not in outcome and child.returncode != 0:
      print(output[-2000:])
      sys.exit(f'trial {trial}: SIGTERM must save and exit 0, got {child.returncode}.')
    if 'finished' in outcome:
      break

  full_disk(args, faulty, env, rng)
  subprocess.run(faulty_command, check=True, cwd=REPO, env=env, stdout=subprocess.DEVNULL)
  want, got = losses(straight), losses(faulty)
  same_steps = sorted(want) == sorted(got)
  worst = max(abs(want[s] - got[s]) for s in want) if same_steps else float('inf')
  (step_a, params_a), (step_b, params_b) = final_params(straight), final_params(faulty)
  import jax  # pylint: disable=import-outside-toplevel
  same_params = step_a == step_b and all(
      np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params_a),
                                           jax.tree.leaves(params_b)))
  print(f'{len(got)} logged steps (uninterrupted: {len(want)}); largest loss difference '
        f'{worst:.3g}; final step {step_b} (uninterrupted: {step_a}); final parameters '
        f'{"bit-identical" if same_params else "DIFFERENT"}.')
  if not (same_steps and worst == 0 and same_params):
    sys.exit(1)
  print('PASS: the interrupted run reproduces the uninterrupted one exactly.')


if __name__ == '__main__':
  main()

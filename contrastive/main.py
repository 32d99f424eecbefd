"""Command-line entry point.

    python -m contrastive.main --config=configs/quickstart.py --workdir=/tmp/run

Any config field can be overridden, e.g. ``--config.global_batch_size=256``; an
unknown field is an error. Running the same command again resumes from the
workdir's latest checkpoint. On a multi-process cluster (TPU pod, SLURM, Open MPI)
add ``--distributed`` so every process joins one JAX runtime.
"""


import jax
from absl import app
from absl import flags
from ml_collections import config_flags

from contrastive import command_line
from contrastive import train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, metrics, results.')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False, 'Call jax.distributed.initialize() (multi-host runs; the '
    'coordinator is auto-detected on TPU pods, SLURM and Open MPI).')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0, where not auto-detected.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Where not auto-detected.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Where not auto-detected.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  def work():
    if _DISTRIBUTED.value:
      jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                                 num_processes=_NUM_PROCESSES.value,
                                 process_id=_PROCESS_ID.value)
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)

  command_line.run(argv, work)


if __name__ == '__main__':
  app.run(main)

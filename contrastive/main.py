"""Command-line entry point of pretraining.

    python -m contrastive.main --config=configs/quickstart.py --workdir=/tmp/run

Any config field can be overridden, e.g. ``--config.global_batch_size=256``; an
unknown field is an error. Running the same command again resumes from the
workdir's latest checkpoint. On a multi-process cluster (TPU pod, SLURM, Open MPI)
add ``--distributed`` so every process joins one JAX runtime.
"""

from contrastive import command_line
from contrastive import train

if __name__ == '__main__':
  command_line.run_config_command(train.train_and_evaluate, 'Experiment config file.')

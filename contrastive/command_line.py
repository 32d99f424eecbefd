"""What every ``python -m contrastive.*`` command does around its own work."""

import sys

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags


def run(argv, work):
  """Calls ``work()`` the way all commands do.

  Stray positional arguments are refused; libraries' INFO logs (Orbax) stay off the
  console unless ``--verbosity`` is given; a config or data error (ValueError,
  FileNotFoundError) says what to change in one line and exits with status 1, the
  traceback only with ``--verbosity=1``; a run stopped by a signal after saving
  its checkpoint (:class:`contrastive.loop.Preempted`) says how to resume and
  exits with status 0.
  """
  from contrastive import loop  # pylint: disable=import-outside-toplevel
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  try:
    return work()
  except loop.Preempted as stopped:
    print(stopped, flush=True)
    sys.exit(0)
  except (ValueError, FileNotFoundError) as err:
    logging.debug('Traceback of the error below:', exc_info=True)
    print(f'error: {err}\n(rerun with --verbosity=1 for the traceback)', file=sys.stderr)
    sys.exit(1)


def run_config_command(train_and_evaluate, config_help: str) -> None:
  """``--config FILE --workdir DIR [--distributed ...]`` -> ``train_and_evaluate``.

  The flags of the training commands (pretraining and downstream evaluation).
  They are defined here, when the command starts, so that importing a command's
  module (config files import the schema) leaves the importer's flags alone.
  """
  config = config_flags.DEFINE_config_file('config', None, config_help, lock_config=True)
  workdir = flags.DEFINE_string('workdir', None, 'Checkpoints, metrics, results.')
  distributed = flags.DEFINE_bool(
      'distributed', False, 'Call jax.distributed.initialize() (multi-host runs; the '
      'coordinator is auto-detected on TPU pods, SLURM and Open MPI).')
  coordinator = flags.DEFINE_string(
      'coordinator_address', None, 'host:port of process 0, where not auto-detected.')
  num_processes = flags.DEFINE_integer('num_processes', None, 'Where not auto-detected.')
  process_id = flags.DEFINE_integer('process_id', None, 'Where not auto-detected.')
  flags.mark_flags_as_required(['config', 'workdir'])

  def work():
    if distributed.value:
      jax.distributed.initialize(coordinator_address=coordinator.value,
                                 num_processes=num_processes.value,
                                 process_id=process_id.value)
    train_and_evaluate(config.value, workdir.value)

  app.run(lambda argv: run(argv, work), flags_parser=_parse_flags)


def _parse_flags(argv):
  """absl's flag parsing, with an override of a field the config lacks named in
  one line instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as err:
    name = str(err).strip('"\'')
    given = [arg for arg in argv[1:] if arg.startswith('--config.') and
             name in arg.split('=', 1)[0].split('.')]
    print(f'error: {given[0] if given else name}: the config has no field {name!r} '
          '(see the config file and contrastive/config.py for the fields).',
          file=sys.stderr)
    sys.exit(1)
  except flags.Error as err:
    print(f'error: {err}', file=sys.stderr)
    sys.exit(1)

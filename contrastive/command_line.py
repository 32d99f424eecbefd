"""What every ``python -m contrastive.*`` command does around its own work."""

import contextlib
import importlib.machinery
import importlib.util
import logging as python_logging
import os
import re
import sys
import traceback

import jax
import ml_collections
from absl import app
from absl import flags
from absl import logging
from jax.extend import backend as jax_backend
from ml_collections import config_flags



def run(argv, work, distributed=None):
  """Calls ``work()`` the way all commands do.

  Stray positional arguments are refused; libraries' INFO logs (Orbax) stay off the
  console unless ``--verbosity`` is given; ``jax.distributed.initialize(**distributed)``
  where given, then JAX starts, so that a platform JAX_PLATFORMS asks for and this
  machine lacks is one line before anything is read; a config or data error
  (ValueError) or one of the machine (OSError: a missing file, a full disk, a
  failed checkpoint save) says what to change in one line and exits with status
  1, the traceback only with ``--verbosity=1``; a run stopped by a signal
  after saving its checkpoint (:class:`contrastive.loop.Preempted`) says how to
  resume and exits with status 0.
  """
  from contrastive import loop  # pylint: disable=import-outside-toplevel
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  try:
    if distributed:
      jax.distributed.initialize(**distributed)
    _start_jax()
    return work()
  except loop.Preempted as stopped:
    print(stopped, flush=True)
    sys.exit(0)
  except (ValueError, OSError) as err:
    logging.debug('Traceback of the error below:', exc_info=True)
    print(f'error: {err}\n(rerun with --verbosity=1 for the traceback)', file=sys.stderr)
    sys.exit(1)


def _start_jax() -> None:
  """Starts JAX's platforms; one that JAX_PLATFORMS names and JAX cannot start
  (jax 0.10: RuntimeError, or AssertionError for cuda without an NVIDIA GPU) is
  one line listing the platforms this machine has."""
  try:
    jax.devices()
  except (RuntimeError, AssertionError) as err:
    asked = jax.config.jax_platforms
    if not asked:
      raise
    jax_backend.clear_backends()
    jax.config.update('jax_platforms', None)
    # Its warning on falling back to the CPU says what the line below says.
    python_logging.getLogger('jax').setLevel(python_logging.ERROR)
    present = ', '.join(sorted(jax_backend.backends()))
    print(f'error: JAX_PLATFORMS={asked}: JAX cannot start it here '
          f'({str(err) or "no NVIDIA GPU is visible"}); this machine has: {present}. '
          'Unset JAX_PLATFORMS or set it to one of those; an NVIDIA GPU also needs '
          'pip install "jax[cuda12]".', file=sys.stderr)
    sys.exit(1)


class ConfigFileError(Exception):
  """A ``--config`` file that cannot give a config, in one line naming the file;
  its ``__cause__``, where set, is the exception the file's code raised."""


def load_config_file(argument: str) -> ml_collections.ConfigDict:
  """``FILE[:ARG]`` -> the python file FILE's ``get_config(ARG)`` (``get_config()``
  without ``:ARG``), holding only fields of the schema (contrastive/config.py);
  every other outcome is a ConfigFileError."""
  path, *arg = argument.split(':', 1)
  if not os.path.isfile(path):
    raise ConfigFileError(f'{path}: no such config file' + (
        '' if os.path.isabs(path) else f' (relative to {os.getcwd()})'))
  loader = importlib.machinery.SourceFileLoader('config_file', path)
  module = importlib.util.module_from_spec(importlib.util.spec_from_loader(
      loader.name, loader))
  with _raised_in(path):
    loader.exec_module(module)
  if not callable(getattr(module, 'get_config', None)):
    raise ConfigFileError(f'{path}: defines no get_config(); a config file ends with '
                          'def get_config(arg=None): ... return config (see '
                          'configs/quickstart.py)')
  with _raised_in(path):
    config = module.get_config(*arg)
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigFileError(f'{path}: get_config() returned a {type(config).__name__}, '
                          'not the ConfigDict of contrastive.config.base_config() '
                          '(or downstream_config())')
  from contrastive import config as config_lib  # pylint: disable=import-outside-toplevel
  unknown = config_lib.unknown_fields(config)
  if unknown:
    with open(path, encoding='utf-8') as file:
      source = file.read()
    raise ConfigFileError('; '.join(
        f'{_where(path, source, field)}: config.{field} is not a config field' +
        (f' (did you mean config.{close}?)' if close else '')
        for field, close in unknown.items()) + '. contrastive/config.py has every field.')
  return config


@contextlib.contextmanager
def _raised_in(path: str):
  """An exception of the config file's code -> ConfigFileError naming the file and
  its line (the last one the traceback passes through, or the error's own for a
  syntax error in the file or in a module it imports)."""
  try:
    yield
  except SyntaxError as err:
    raise ConfigFileError(f'{err.filename}:{err.lineno}: SyntaxError: {err.msg}') from err
  except Exception as err:  # pylint: disable=broad-except
    lines = [frame.lineno for frame in traceback.extract_tb(err.__traceback__)
             if frame.filename == path]
    where = f'{path}:{lines[-1]}' if lines else path
    message = ' '.join(str(err).splitlines())
    raise ConfigFileError(f'{where}: {type(err).__name__}: {message}') from err


def _where(path: str, source: str, field: str) -> str:
  """``path:line`` of the line of ``source`` that sets ``field`` (its whole dotted
  path first, then its last name alone); ``path`` where none does."""
  for name in (field, field.rsplit('.', 1)[-1]):
    sets = re.compile(rf'[.\[\'"]{re.escape(name)}\b[\'"]?\]?\s*=(?!=)')
    for number, line in enumerate(source.splitlines(), 1):
      if sets.search(line):
        return f'{path}:{number}'
  return path


class _ConfigFileParser(flags.ArgumentParser):
  """``--config=FILE[:ARG]`` through :func:`load_config_file`, then locked (a
  command-line override of a field the config lacks is then an error too)."""

  def parse(self, argument):
    return load_config_file(argument).lock()

  def flag_type(self):
    return 'config object'


def run_config_command(train_and_evaluate, config_help: str) -> None:
  """``--config FILE --workdir DIR [--distributed ...]`` -> ``train_and_evaluate``.

  The flags of the training commands (pretraining and downstream evaluation).
  They are defined here, when the command starts, so that importing a command's
  module (config files import the schema) leaves the importer's flags alone.
  """
  config = config_flags.DEFINE_config_file('config', None, config_help)
  flags.FLAGS[config.name].parser = _ConfigFileParser()
  workdir = flags.DEFINE_string('workdir', None, 'Checkpoints, metrics, results.')
  distributed = flags.DEFINE_bool(
      'distributed', False, 'Call jax.distributed.initialize() (multi-host runs; the '
      'coordinator is auto-detected on TPU pods, SLURM and Open MPI).')
  coordinator = flags.DEFINE_string(
      'coordinator_address', None, 'host:port of process 0, where not auto-detected.')
  num_processes = flags.DEFINE_integer('num_processes', None, 'Where not auto-detected.')
  process_id = flags.DEFINE_integer('process_id', None, 'Where not auto-detected.')
  flags.mark_flags_as_required(['config', 'workdir'])

  def main(argv):
    run(argv, lambda: train_and_evaluate(config.value, workdir.value),
        distributed=dict(coordinator_address=coordinator.value,
                         num_processes=num_processes.value,
                         process_id=process_id.value) if distributed.value else None)

  app.run(main, flags_parser=_parse_flags)


def _parse_flags(argv):
  """absl's flag parsing, with a broken config file, or an override of a field the
  config lacks, named in one line instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except ConfigFileError as err:
    if err.__cause__ is None:
      print(f'error: {err}', file=sys.stderr)
    elif _verbosity(argv) >= 1:
      traceback.print_exception(err.__cause__)
      print(f'error: {err}', file=sys.stderr)
    else:
      print(f'error: {err} (rerun with --verbosity=1 for the traceback)', file=sys.stderr)
    sys.exit(1)
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


def _verbosity(argv) -> int:
  """``--verbosity`` (``-v``) in ``argv``, which absl leaves unparsed after a flag
  that failed."""
  values = flags.FlagValues()
  flags.DEFINE_integer('verbosity', -1, '', short_name='v', flag_values=values)
  values.set_gnu_getopt(True)
  values(argv, known_only=True)
  return values.verbosity

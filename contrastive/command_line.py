"""What every ``python -m contrastive.*`` command does around its own work."""

import sys

from absl import app
from absl import flags
from absl import logging


def run(argv, work):
  """Calls ``work()`` the way all commands do.

  Stray positional arguments are refused; libraries' INFO logs (Orbax) stay off the
  console unless ``--verbosity`` is given; a config or data error (ValueError,
  FileNotFoundError) says what to change in one line and exits with status 1, the
  traceback only with ``--verbosity=1``.
  """
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  try:
    return work()
  except (ValueError, FileNotFoundError) as err:
    logging.debug('Traceback of the error below:', exc_info=True)
    print(f'error: {err}\n(rerun with --verbosity=1 for the traceback)', file=sys.stderr)
    sys.exit(1)

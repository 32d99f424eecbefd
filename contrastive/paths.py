"""Where a run's files live: a local folder or a bucket (``gs://bucket/run``).

Every file the library reads or writes goes through :func:`resolve`, an
``etils.epath.Path`` (the path type Orbax uses), so one code path serves local
disks and object stores alike. Local paths are made absolute; URLs are kept as
they are (``os.path.abspath`` would turn ``gs://b/run`` into a local ``gs:/b/run``).
"""

import os

from etils import epath


def is_url(path) -> bool:
  return '://' in str(path)


def resolve(path) -> epath.Path:
  """``path`` as an epath.Path: absolute when local, unchanged when a URL."""
  if is_url(path):
    return epath.Path(str(path))
  return epath.Path(path).expanduser().resolve()


def write_atomically(path: epath.Path, data: str | bytes) -> None:
  """Writes ``data`` so that a reader finds the old file or the new one, never a
  part of it (what a kill or a full disk mid-write leaves): on a local disk it is
  written beside, synced and renamed over (through a symlink, which stays). An
  object store writes objects whole, and a file that is not a regular one
  (/dev/null) would be replaced by a rename: both are written directly."""
  path = epath.Path(path)
  if is_url(path) or (os.path.exists(path) and not os.path.isfile(path)):
    (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)
    return
  target = os.path.realpath(path)
  partial = os.path.join(os.path.dirname(target),
                         f'.{os.path.basename(target)}.partial-{os.getpid()}')
  try:
    with open(partial, 'wb') as f:
      f.write(data if isinstance(data, bytes) else data.encode('utf-8'))
      f.flush()
      os.fsync(f.fileno())
    os.replace(partial, target)
  finally:
    if os.path.exists(partial):
      os.remove(partial)

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


def write_atomically(path: epath.Path, text: str) -> None:
  """Writes ``text`` so that a reader finds the old file or the new one, never a
  part of it (what a kill or a full disk mid-write leaves): on a local disk it is
  written beside, synced and renamed over; an object store writes objects whole."""
  if is_url(path):
    path.write_text(text)
    return
  partial = path.with_name(f'.{path.name}.partial')
  with open(partial, 'w', encoding='utf-8') as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(partial, path)

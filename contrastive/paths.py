"""Where a run's files live: a local folder or a bucket (``gs://bucket/run``).

Every file the library reads or writes goes through :func:`resolve`, an
``etils.epath.Path`` (the path type Orbax uses), so one code path serves local
disks and object stores alike. Local paths are made absolute; URLs are kept as
they are (``os.path.abspath`` would turn ``gs://b/run`` into a local ``gs:/b/run``).
"""

from etils import epath


def is_url(path) -> bool:
  return '://' in str(path)


def resolve(path) -> epath.Path:
  """``path`` as an epath.Path: absolute when local, unchanged when a URL."""
  if is_url(path):
    return epath.Path(str(path))
  return epath.Path(path).expanduser().resolve()

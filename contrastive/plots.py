"""Pictures of a run: training curves, and nearest-neighbour retrievals.

    python -m contrastive.plots --workdir=/tmp/quickstart --what=curves,retrievals

``curves`` (any workdir with a metrics.jsonl, pretraining or downstream) writes
``training_curves.png``: loss, learning rate and every accuracy the run logged
(kNN monitor, online probe, final evaluations), against epochs where the run
logged them, else steps. ``retrievals`` (a pretraining workdir) writes
``retrievals.png``: query images from the eval split and their nearest training
images by cosine similarity of the encoder's features, framed green where the
label matches the query's and red where it does not. Both go into the workdir,
or into ``--out_dir`` (made if missing), for a workdir this user cannot write.

Drawing uses matplotlib's Agg renderer through ``Figure`` objects, never pyplot's
global state, so it works without a display and inside other programs.
"""

import os

import numpy as np
from absl import app
from absl import flags

from contrastive import command_line
from contrastive import metrics as metrics_lib
from contrastive import paths

PLOTS = ('curves', 'retrievals')
_MATCH, _MISMATCH, _QUERY = '#2ca02c', '#d62728', '#1f77b4'


# ----------------------------------------------------------------------------- curves

def curve_panels(records: dict[int, dict]) -> dict[str, dict[str, tuple]]:
  """``{panel: {series: (x, y)}}`` from :func:`metrics.read_metrics` records.

  Panels: 'loss', 'learning rate' and 'accuracy' (every scalar whose name ends
  in 'accuracy'), each only if the run logged it. x is in epochs when the run
  logged an 'epoch' (records without one, such as final evaluations, get theirs
  from the step), else in steps.
  """
  steps = np.array(sorted(records))
  with_epoch = [s for s in steps if 'epoch' in records[s]]
  epochs_per_step = (records[with_epoch[-1]]['epoch'] / with_epoch[-1]
                     if with_epoch and with_epoch[-1] else None)
  panels = {'loss': {}, 'learning rate': {}, 'accuracy': {}}
  names = sorted({name for record in records.values() for name in record})
  for name in names:
    if name == 'loss':
      panel = 'loss'
    elif name == 'learning_rate':
      panel = 'learning rate'
    elif name.endswith('accuracy'):
      panel = 'accuracy'
    else:
      continue
    at = [s for s in steps if name in records[s]]
    x = np.array(at, float) * (epochs_per_step or 1.0)
    panels[panel][name] = (x, np.array([records[s][name] for s in at], float))
  return {panel: series for panel, series in panels.items() if series}


def save_figure(figure, path, dpi: int) -> None:
  """A PNG at ``path``, a local file or a bucket URL."""
  with paths.resolve(path).open('wb') as f:
    figure.savefig(f, format='png', dpi=dpi)


def plot_training_curves(workdir: str, out_path: str | None = None) -> str:
  """Writes the loss / learning-rate / accuracy panels of ``workdir``; returns the path."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  out_path = str(out_path or paths.resolve(workdir) / 'training_curves.png')
  if not (paths.resolve(workdir) / 'metrics.jsonl').exists():
    raise FileNotFoundError(f'{workdir} has no metrics.jsonl: is it the workdir of a run?')
  records = metrics_lib.read_metrics(workdir)
  panels = curve_panels(records)
  if not panels:
    raise ValueError(f'{workdir}/metrics.jsonl has no loss, learning rate or accuracy.')
  in_epochs = any('epoch' in record for record in records.values())
  figure = Figure(figsize=(4.5 * len(panels), 3.6), layout='constrained')
  # One x range for all panels, so a final evaluation sits at the end of training.
  axes = figure.subplots(1, len(panels), sharex=True, squeeze=False)[0]
  for ax, (panel, series) in zip(axes, panels.items()):
    for name, (x, y) in series.items():
      # A lone point (a final evaluation) needs a marker to be seen.
      ax.plot(x, y, marker='o' if len(x) < 20 else None, markersize=4, label=name)
    ax.set_title(panel)
    ax.set_xlabel('epoch' if in_epochs else 'step')
    ax.grid(alpha=0.3)
    if panel == 'accuracy':
      ax.set_ylim(0, 1)
    if len(series) > 1 or panel == 'accuracy':
      ax.legend(fontsize='small')
  figure.suptitle(paths.resolve(workdir).name)
  save_figure(figure, out_path, dpi=100)
  return out_path


# ----------------------------------------------------------------------------- retrievals

def nearest_neighbours(query_features, gallery_features, k: int):
  """Indices [Q, k] and cosine similarities [Q, k] of each query's k most similar
  gallery rows, most similar first."""
  def normalise(x):
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

  similarity = normalise(query_features) @ normalise(gallery_features).T
  k = min(k, similarity.shape[1])
  # Ties broken by gallery order, so the result is deterministic.
  order = np.argsort(-similarity, axis=-1, kind='stable')[:, :k]
  return order, np.take_along_axis(similarity, order, axis=-1)


def _split_block(data, split: str, max_images: int):
  """The first contiguous block of at most ~``max_images`` images of a split, so a
  large dataset is not decoded whole."""
  from contrastive.data import sources  # pylint: disable=g-import-not-at-top
  total = sources.split_info(data, split).num_examples
  blocks = max(1, -(-total // max_images))
  return sources.load_arrays(data, split, shard_index=0, shard_count=blocks)


def plot_retrievals(workdir: str, out_path: str | None = None, num_queries: int = 8,
                    k: int = 8, seed: int = 0, max_gallery: int = 10_000) -> str:
  """Draws eval-split queries (drawn with ``seed``) and their k nearest training
  images among at most ``max_gallery``; returns the path."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  from contrastive import reader  # pylint: disable=g-import-not-at-top
  _check_counts(num_queries, k)
  out_path = str(out_path or paths.resolve(workdir) / 'retrievals.png')
  pretrained = reader.load_pretrained(workdir)
  gallery = _split_block(pretrained.config.data, 'train', max_gallery)
  queries = _split_block(pretrained.config.data, 'eval', max_gallery)
  if gallery.labels is None:
    raise ValueError('Retrievals are judged by label, and the training split has none.')
  chosen = np.sort(np.random.default_rng(seed).choice(
      len(queries.labels), min(num_queries, len(queries.labels)), replace=False))
  neighbours, similarity = nearest_neighbours(
      reader.encode(pretrained, queries.images[chosen]),
      reader.encode(pretrained, gallery.images), k)

  rows, cols = len(chosen), neighbours.shape[1] + 1
  figure = Figure(figsize=(1.2 * cols, 1.35 * rows), layout='constrained')
  axes = figure.subplots(rows, cols, squeeze=False)
  for row, query in enumerate(chosen):
    query_label = queries.labels[query]
    _show(axes[row, 0], queries.images[query], _QUERY, f'query: {query_label}')
    for col, (index, sim) in enumerate(zip(neighbours[row], similarity[row]), start=1):
      label = gallery.labels[index]
      _show(axes[row, col], gallery.images[index],
            _MATCH if label == query_label else _MISMATCH, f'{label}  {sim:.2f}')
  figure.suptitle(f'{paths.resolve(workdir).name}, step {pretrained.step}: '
                  f'{k} nearest of {len(gallery.labels)} training images '
                  '(label  cosine similarity)', fontsize='small')
  save_figure(figure, out_path, dpi=100)
  return out_path


def _check_counts(num_queries: int, k: int) -> None:
  for name, value in (('num_queries', num_queries), ('k', k)):
    if value < 1:
      raise ValueError(f'--{name}={value}: retrievals need at least 1.')


def _show(ax, image, colour: str, title: str) -> None:
  ax.imshow(image, interpolation='nearest')
  ax.set_xticks([])
  ax.set_yticks([])
  for spine in ax.spines.values():
    spine.set_edgecolor(colour)
    spine.set_linewidth(3)
  ax.set_title(title, fontsize=7, pad=2)


# ----------------------------------------------------------------------------- command line

def write_pictures(workdir: str, what=PLOTS, out_dir: str | None = None,
                   num_queries: int = 8, k: int = 8) -> list[str]:
  """The pictures ``what`` names, in ``out_dir`` (default: the workdir); returns
  their paths. The folder and the counts are checked before any drawing, so that
  neither fails after minutes of encoding."""
  folder = _output_folder(workdir, out_dir)
  if 'retrievals' in what:
    _check_counts(num_queries, k)
  written = []
  for name in what:
    if name == 'curves':
      written.append(plot_training_curves(workdir, str(folder / 'training_curves.png')))
    else:
      written.append(plot_retrievals(workdir, str(folder / 'retrievals.png'),
                                     num_queries=num_queries, k=k))
  return written


def _output_folder(workdir: str, out_dir: str | None):
  """``out_dir`` (made if missing), else the workdir, checked by writing a file into it."""
  folder = paths.resolve(out_dir or workdir)
  where = f'--out_dir={out_dir}' if out_dir else f'the workdir {workdir}'
  if not out_dir and not folder.is_dir():
    return folder            # the pictures say what the workdir lacks
  if folder.exists() and not folder.is_dir():
    raise ValueError(f'{where} is a file: give --out_dir a folder for the pictures.')
  try:
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f'.write_test.{os.getpid()}'
    probe.write_bytes(b'')
    probe.unlink()
  except OSError as err:
    raise ValueError(f'{where} is not writable ({err.strerror or err}): write the pictures '
                     'into another folder with --out_dir=DIR.') from err
  return folder


def _run_command(argv):
  values = flags.FLAGS

  def work():
    for path in write_pictures(values.workdir, values.what, values.out_dir,
                               values.num_queries, values.k):
      print(f'Wrote {path}.')

  command_line.run(argv, work)


def main():
  """``python -m contrastive.plots``; flags defined here, not at import."""
  flags.DEFINE_string('workdir', None, 'Workdir of a run.')
  flags.DEFINE_list('what', list(PLOTS), f'Which pictures: {", ".join(PLOTS)}.')
  flags.register_validator('what', lambda values: bool(values) and set(values) <= set(PLOTS),
                           f'--what takes a comma-separated subset of {", ".join(PLOTS)}.')
  flags.DEFINE_string('out_dir', None, 'Folder for the pictures; default: the workdir.')
  flags.DEFINE_integer('num_queries', 8, 'Retrievals: query images.')
  flags.DEFINE_integer('k', 8, 'Retrievals: neighbours per query.')
  flags.mark_flags_as_required(['workdir'])
  app.run(_run_command)


if __name__ == '__main__':
  main()

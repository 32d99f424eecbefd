r"""Accuracy against the number of negatives: SimCLR, memory bank, MoCo, instance classifier.

    python -m contrastive.studies.negatives --config=configs/negatives_study.py \
        --workdir=/tmp/negatives --config.base.data.path=/data/cifar10/train

The three ways of getting negatives, in the spirit of the MoCo paper's Figure 3,
trained end to end on the same data, encoder, augmentation, head, temperature,
optimizer and number of epochs; only the mechanism and its number of negatives
change:

- SimCLR (end-to-end): the other views of the batch, 2B - 2 negatives, so the
  batch size B is what varies;
- memory bank: ``membank.num_negatives`` rows drawn from the bank, batch fixed;
- MoCo: the queue of ``moco.queue_size`` keys, batch fixed;
- instance classification: a classifier row per image, all N - 1 other images
  as negatives, with and without the contrastive prior and label smoothing.

Each run lives in ``<workdir>/<method>_<negatives>``; a finished run (its
``eval.json`` exists) is not run again, so the same command continues an
interrupted study. The study ends with ``results.json``, ``results.md`` (a table)
and ``negatives.png`` (kNN top-1 against the number of negatives, log scale).
"""

import json
import time

import ml_collections
from absl import app
from absl import flags
from ml_collections import config_flags

from contrastive import command_line
from contrastive import paths
from contrastive import plots
from contrastive import train
from contrastive.data import sources
from contrastive.methods import get_method

STUDY_METHODS = ('simclr', 'membank', 'moco', 'instance_cls')


def planned_runs(config: ml_collections.ConfigDict) -> list[dict]:
  """One entry per run: method, number of negatives (None: all N - 1 other images,
  known once the data is listed), batch size, its directory name and its config."""
  sweeps = {'simclr': config.simclr_batch_sizes, 'membank': config.membank_negatives,
            'moco': config.moco_queue_sizes, 'instance_cls': config.instance_cls_variants}
  runs = []
  for method in STUDY_METHODS:
    for value in sweeps[method]:
      run = ml_collections.ConfigDict(config.base.to_dict())
      run.method = method
      run.simclr.temperature = run.moco.temperature = config.temperature
      run.membank.temperature = run.instance_cls.temperature = config.temperature
      variant = ''
      if method == 'simclr':
        run.global_batch_size, negatives = value, 2 * value - 2
      elif method == 'instance_cls':
        prior, smoothing = value
        run.global_batch_size, negatives = config.batch_size, None
        run.instance_cls.contrastive_prior, run.instance_cls.smoothing = prior, smoothing
        variant = f'prior {"on" if prior else "off"}, smoothing {smoothing:g}'
      else:
        run.global_batch_size, negatives = config.batch_size, value
        if method == 'moco':
          run.moco.queue_size = value
        else:
          run.membank.num_negatives = value
      name = (f'{method}_prior{int(value[0])}_smoothing{value[1]:g}'
              if method == 'instance_cls' else f'{method}_{negatives}')
      runs.append({'method': method, 'negatives': negatives, 'variant': variant,
                   'batch_size': run.global_batch_size, 'name': name, 'config': run})
  return runs


def run_study(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """Trains every planned run (skipping finished ones) and writes the summary."""
  runs = planned_runs(config)
  for run in runs:           # every run's config, before the first one trains for an hour
    train.check_config(run['config'], get_method(run['method']))
  rows = []
  for run in runs:
    run_dir = paths.resolve(workdir) / run['name']
    row_path = run_dir / 'study_row.json'
    if row_path.exists():
      rows.append(json.loads(row_path.read_text()))
      print(f'{run["name"]}: done before, kept.')
      continue
    negatives = run['negatives']
    if negatives is None:
      negatives = sources.split_info(run['config'].data, 'train').num_examples - 1
    print(f'--- {run["name"]}: {negatives} negatives, batch {run["batch_size"]}')
    start = time.time()
    results = train.train_and_evaluate(run['config'], str(run_dir))['trained']
    row = {'method': run['method'], 'variant': run['variant'], 'negatives': negatives,
           'batch_size': run['batch_size'], 'minutes': (time.time() - start) / 60,
           **results}
    row_path.write_text(json.dumps(row, indent=2))
    rows.append(row)
  write_summary(rows, config, workdir)
  return rows


LABELS = {'simclr': 'SimCLR (end-to-end)', 'membank': 'memory bank', 'moco': 'MoCo',
          'instance_cls': 'instance classifier'}


def write_summary(rows: list[dict], config, workdir: str) -> None:
  workdir = paths.resolve(workdir)
  (workdir / 'results.json').write_text(json.dumps(rows, indent=2))
  (workdir / 'results.md').write_text(format_table(rows, config) + '\n')
  plot(rows, workdir / 'negatives.png', config)
  print(format_table(rows, config))


def _budget(config) -> str:
  base = config.base
  return (f'{base.model.name} width {base.model.width}, {base.num_epochs:g} epochs, '
          f'{base.data.image_size}x{base.data.image_size} images, T={config.temperature}')


def format_table(rows: list[dict], config) -> str:
  lines = [f'Negatives study ({_budget(config)}; kNN k={config.base.eval.knn_k})', '',
           '| method | negatives | batch | kNN top-1 | linear probe top-1 | minutes |',
           '|---|---:|---:|---:|---:|---:|']
  for row in rows:
    method = LABELS[row['method']] + (f' ({row["variant"]})' if row.get('variant') else '')
    lines.append(f'| {method} | {row["negatives"]} | {row["batch_size"]} | '
                 f'{100 * row["knn_accuracy"]:.2f} | '
                 f'{100 * row["linear_probe_accuracy"]:.2f} | {row["minutes"]:.1f} |')
  return '\n'.join(lines)


def plot(rows: list[dict], path: str, config) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  from matplotlib import pyplot  # pylint: disable=import-outside-toplevel
  figure, axes = pyplot.subplots(figsize=(6, 4.2))
  for method in STUDY_METHODS:
    points = sorted((r['negatives'], 100 * r['knn_accuracy']) for r in rows
                    if r['method'] == method)
    if method == 'instance_cls':      # one x (N - 1), a marker per variant
      for r in (r for r in rows if r['method'] == method):
        axes.plot([r['negatives']], [100 * r['knn_accuracy']], marker='*', linestyle='',
                  label=f'{LABELS[method]} ({r["variant"]})')
    elif points:
      axes.plot(*zip(*points), marker='o', label=LABELS[method])
  axes.set_xscale('log', base=2)
  axes.set_xlabel('number of negatives')
  axes.set_ylabel(f'kNN top-1 (%), k={config.base.eval.knn_k}')
  axes.set_title(_budget(config), fontsize=9)
  axes.grid(True, alpha=0.3)
  axes.legend()
  figure.tight_layout()
  plots.save_figure(figure, path, dpi=120)
  pyplot.close(figure)


_CONFIG = config_flags.DEFINE_config_file('config', None, 'Study config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory of the study.')


def main(argv):
  command_line.run(argv, lambda: run_study(_CONFIG.value, _WORKDIR.value))


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)

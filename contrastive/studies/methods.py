r"""Every method's own CIFAR-10 recipe on one shared budget: the learning table of docs/methods.md.

    python -m contrastive.studies.methods --config=configs/methods_study.py \
        --workdir=/tmp/methods --config.budget.data_path=/data/cifar10/train

Each run starts from a method's CIFAR-10 experiment file (its views, heads,
temperature, momentum and optimizer) and takes the study's budget on top: the
same images and held-out split, encoder width, batch, epochs, warmup, a kNN
monitor after every epoch, and queues no longer than the split allows. Only the
method and its recipe differ between runs.

Each run lives in ``<workdir>/<name>``; a finished run (its ``study_row.json``
exists) is kept, so the same command continues an interrupted study. The study
ends with ``results.json`` and ``results.md``: kNN top-1 after every epoch, final
kNN and linear-probe top-1, and minutes per run.
"""

import importlib
import json
import time

import ml_collections
from absl import app
from absl import flags
from ml_collections import config_flags

from contrastive import command_line
from contrastive import metrics
from contrastive import paths
from contrastive import train
from contrastive.methods import get_method

QUEUE_FIELDS = ('moco.queue_size', 'simclr.queue_size', 'cmc.queue_size')


def run_config(recipe: str, budget: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``configs/<recipe>.py`` (``name:arg`` passes ``arg``) with the budget applied."""
  name, _, arg = recipe.partition(':')
  config = importlib.import_module(f'configs.{name}').get_config(arg or None)
  config.global_batch_size = budget.batch_size
  config.num_epochs = budget.num_epochs
  config.log_every_steps = budget.log_every_steps
  config.checkpoint_every_steps = budget.checkpoint_every_steps
  config.model.width = budget.width
  config.model.bn = 'global'
  config.data.source = 'folder'
  config.data.path = budget.data_path
  config.data.holdout_per_class = budget.holdout_per_class
  config.data.in_memory = True
  config.optim.warmup_epochs = min(config.optim.warmup_epochs, budget.warmup_epochs)
  config.eval.knn_every_epochs = 1.0
  config.eval.probe_epochs = budget.probe_epochs
  config.eval.compare_random_init = False
  for field in QUEUE_FIELDS:
    section, key = field.split('.')
    if config[section][key] > budget.max_queue_size:
      config[section][key] = budget.max_queue_size
  return config


def run_study(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  runs = [(label, recipe, run_config(recipe, config.budget)) for label, recipe in config.runs]
  for _, _, run in runs:        # every run's config, before the first one trains
    train.check_config(run, get_method(run.method))
  rows = []
  for label, recipe, run in runs:
    run_dir = paths.resolve(workdir) / recipe.replace(':', '_')
    row_path = run_dir / 'study_row.json'
    if row_path.exists():
      rows.append(json.loads(row_path.read_text()))
      print(f'{label}: done before, kept.')
      continue
    print(f'--- {label} ({recipe})')
    start = time.time()
    results = train.train_and_evaluate(run, str(run_dir))['trained']
    monitor = [record['monitor/knn_accuracy']
               for _, record in sorted(metrics.read_metrics(run_dir).items())
               if 'monitor/knn_accuracy' in record]
    row = {'label': label, 'recipe': recipe, 'method': run.method,
           'minutes': (time.time() - start) / 60, 'knn_per_epoch': monitor, **results}
    row_path.write_text(json.dumps(row, indent=2))
    rows.append(row)
  workdir = paths.resolve(workdir)
  (workdir / 'results.json').write_text(json.dumps(rows, indent=2))
  (workdir / 'results.md').write_text(format_table(rows, config) + '\n')
  print(format_table(rows, config))
  return rows


def format_table(rows: list[dict], config) -> str:
  budget = config.budget
  lines = [f'Methods study (ResNet-18 width {budget.width}, batch {budget.batch_size}, '
           f'{budget.num_epochs:g} epochs, {budget.holdout_per_class} images per class '
           'held out)', '',
           '| method | recipe | kNN top-1 after each epoch | final kNN | linear probe | '
           'minutes |', '|---|---|---|---:|---:|---:|']
  for row in rows:
    curve = ', '.join(f'{100 * v:.1f}' for v in row['knn_per_epoch'])
    lines.append(f'| {row["label"]} | `{row["recipe"]}` | {curve} | '
                 f'{100 * row["knn_accuracy"]:.1f}% | '
                 f'{100 * row["linear_probe_accuracy"]:.1f}% | {row["minutes"]:.1f} |')
  return '\n'.join(lines)


def main(argv):
  command_line.run(argv, lambda: run_study(flags.FLAGS.config, flags.FLAGS.workdir))


if __name__ == '__main__':
  # Defined here, not on import: the negatives study defines the same flags.
  config_flags.DEFINE_config_file('config', None, 'Study config file.', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Directory of the study.')
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)

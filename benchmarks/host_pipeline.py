r"""Host input throughput of the streamed training path against torchvision, per core.

    python benchmarks/host_pipeline.py --path /tmp/data/cifar10/train --workers 2 \
        --json host_pipeline.json [--views 1] [--skip_torch]

It times what the host does to a training image before the accelerator sees it:
decode, then ``--views`` views (2, as in pretraining; 1, as in fine-tuning) each
with a random resized crop (SimCLR's: area (0.08, 1), aspect (3/4, 4/3), bicubic)
and a random flip, batched as uint8. Two datasets:

- the CIFAR-10 JPEG folder at ``--path`` (``--max_images`` of its files, linked into
  a temporary folder), views of 32 px;
- ``--synthetic_count`` ImageNet-sized JPEGs (400-500 px a side, smooth noise at
  several scales, about 100 kB each like ImageNet's), generated once into
  ``--synthetic_dir`` and reused, views of 224 px.

And three paths over each:

- ours, windowed decode: ``pipeline.train_iterator`` decoding each view's window of
  the JPEG (``jpeg_windows=True``), with TensorFlow's shared thread pools as the
  trainer runs it (they size themselves to the cores the process is pinned to);
- ours, full decode: the same, decoding the whole image once (``jpeg_windows=False``);
  the pipeline's default, chosen from these figures;
- torchvision: PIL decode, ``RandomResizedCrop`` + ``RandomHorizontalFlip`` once a
  view, in a ``DataLoader`` with ``--workers`` worker processes and the same batch
  size.

Each path runs in a fresh process pinned to ``--workers`` cores (its workers and
its consumer included), so images/s per core is the rate over those cores; the
files are read once beforehand so that no path waits on the disk. TensorFlow and
torch never share a process: importing torch after TensorFlow crashes. The paths
take ``--rounds`` turns, so that drift in a shared machine's speed moves them alike;
in each, after ``--warmup_batches`` batches, ``--repeats`` windows of
``--timed_images`` images are timed. The table shows the median of a path's
windows, also per CPU-second used (the steadier figure when others share the
machine); the JSON every window, the datasets and the machine (CPU model, cores,
versions).
"""

import json
import math
import multiprocessing
import os
import platform
import queue
import shutil
import statistics
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np
from PIL import Image

# Run as a script from the repository root: its own folder, not the root, is on the path.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

flags.DEFINE_string('path', '/tmp/data/cifar10/train', 'CIFAR-10 JPEG folder (class folders)')
flags.DEFINE_integer('max_images', 10000, 'CIFAR-10 files used, drawn evenly from --path')
flags.DEFINE_string('synthetic_dir', os.path.join(tempfile.gettempdir(),
                                                  'host_pipeline_synthetic'),
                    'cache of the generated ImageNet-sized JPEGs')
flags.DEFINE_integer('synthetic_count', 2000, 'ImageNet-sized JPEGs generated')
flags.DEFINE_integer('workers', 2, 'cores pinned, and DataLoader workers')
flags.DEFINE_integer('views', 2, 'views per image: 2 for pretraining, 1 for fine-tuning')
flags.DEFINE_integer('batch_size', 128, 'images per batch')
flags.DEFINE_integer('warmup_batches', 20, 'batches consumed before timing')
flags.DEFINE_integer('timed_images', 2048, 'images per timed window')
flags.DEFINE_integer('repeats', 2, 'timed windows a turn')
flags.DEFINE_integer('rounds', 3, 'turns the paths take, each in a fresh process; the '
                     'table shows the median of all their windows')
flags.DEFINE_bool('skip_torch', False, 'time only our path (torch need not be installed)')
flags.DEFINE_string('json', '', 'where to write every figure as JSON')
FLAGS = flags.FLAGS

CROP_AREA = (0.08, 1.0)
CROP_ASPECT = (3 / 4, 4 / 3)
FLIP_PROB = 0.5
SYNTHETIC_SIDES = (400, 500)
JPEG_QUALITY = 90


# ----------------------------------------------------------------------------- datasets

def _image_files(root: str) -> list[str]:
  return sorted(os.path.join(folder, name) for folder, _, names in os.walk(root)
                for name in names if name.lower().endswith(('.jpg', '.jpeg')))


def _cifar_folder(root: str, count: int, into: str) -> list[str]:
  """Links ``count`` files of ``root``, drawn evenly over its classes, into ``into``
  (class folders kept), so that both paths read the same subset; returns their paths."""
  files = _image_files(root)
  if not files:
    raise ValueError(f'No JPEG files under --path={root!r}.')
  chosen = sorted(np.random.default_rng(0).permutation(len(files))[:count])
  links = []
  for i in chosen:
    link = os.path.join(into, os.path.relpath(files[i], root))
    os.makedirs(os.path.dirname(link), exist_ok=True)
    os.symlink(files[i], link)
    links.append(link)
  return links


def _smooth_noise(rng, height: int, width: int) -> np.ndarray:
  """uint8 [height, width, 3]: brightness and weaker colour fields at coarse to fine
  scales, plus pixel noise, so a JPEG of it has a photo's size and decode cost (flat or
  white noise would be far smaller or larger)."""

  def field(cells, channels):
    noise = rng.normal(0, 1, (cells, cells, channels)).astype(np.float32)
    return np.stack([np.asarray(Image.fromarray(noise[..., c], 'F').resize(
        (width, height), Image.BICUBIC)) for c in range(channels)], axis=-1)

  image = np.full((height, width, 3), 128, np.float32)
  for cells, amplitude in ((4, 50), (16, 30), (64, 24), (256, 24)):
    image += amplitude * field(cells, 1) + 0.4 * amplitude * field(cells, 3)
  image += rng.normal(0, 4, image.shape)
  return np.clip(image, 0, 255).astype(np.uint8)


def _synthetic_folder(folder: str, count: int) -> list[str]:
  """The ``count`` synthetic JPEGs in ``folder``, generating the missing ones (image
  ``i`` is drawn from seed ``i``, so the set is the same whatever was cached)."""
  os.makedirs(folder, exist_ok=True)
  paths = [os.path.join(folder, f'{i:05d}.jpg') for i in range(count)]
  missing = [i for i, path in enumerate(paths) if not os.path.exists(path)]
  if missing:
    print(f'Generating {len(missing)} JPEGs into {folder} ...', flush=True)
  for i in missing:
    rng = np.random.default_rng(i)
    height, width = rng.integers(SYNTHETIC_SIDES[0], SYNTHETIC_SIDES[1] + 1, size=2)
    # Written under a temporary name first: an interrupted run leaves no partial file.
    Image.fromarray(_smooth_noise(rng, height, width)).save(paths[i] + '.part', 'JPEG',
                                                            quality=JPEG_QUALITY)
    os.replace(paths[i] + '.part', paths[i])
  return paths


def _describe(name: str, paths: list[str], view_size: int) -> dict:
  """The dataset's figures; reads every file once, which also puts it in the page cache."""
  sizes, shapes = [], []
  for path in paths:
    with open(path, 'rb') as f:
      sizes.append(len(f.read()))
    with Image.open(path) as image:   # reads the header only
      shapes.append(image.size[::-1])
  heights, widths = zip(*shapes)
  return {'name': name, 'files': len(paths), 'mean_kB': round(sum(sizes) / len(sizes) / 1e3, 1),
          'heights': [min(heights), max(heights)], 'widths': [min(widths), max(widths)],
          'view_size': view_size}


# ----------------------------------------------------------------------------- timing

def _cpu_seconds() -> float:
  """CPU time used so far by this process (all its threads) and its descendants
  (DataLoader workers), from /proc."""
  parent, ticks = {}, {}
  for entry in os.listdir('/proc'):
    if entry.isdigit():
      try:
        with open(f'/proc/{entry}/stat') as f:
          fields = f.read().rsplit(')', 1)[1].split()   # after the command name
      except OSError:   # the process has gone
        continue
      parent[int(entry)], ticks[int(entry)] = int(fields[1]), int(fields[11]) + int(fields[12])
  ours, grew = {os.getpid()}, True
  while grew:
    children = {pid for pid, ppid in parent.items() if ppid in ours} - ours
    ours, grew = ours | children, bool(children)
  return sum(ticks[pid] for pid in ours) / os.sysconf('SC_CLK_TCK')


def _rates(batches, batch_size: int, warmup_batches: int, timed_images: int,
           repeats: int) -> list[dict]:
  """Images per second and per CPU-second over each of ``repeats`` windows of whole
  batches after the warm-up. On a shared machine CPU time counts only what this
  measurement used, while wall time also counts the cores taken by others."""
  for _ in range(warmup_batches):
    next(batches)
  steps = math.ceil(timed_images / batch_size)
  windows = []
  for _ in range(repeats):
    wall, cpu = time.perf_counter(), _cpu_seconds()
    for _ in range(steps):
      next(batches)
    images = steps * batch_size
    windows.append({'images_per_s': images / (time.perf_counter() - wall),
                    'images_per_cpu_s': images / (_cpu_seconds() - cpu)})
  return windows


def _ours(folder: str, jpeg_windows: bool, size: int, views: int, workers: int,
          timing: dict) -> dict:
  del workers   # TensorFlow's pools size themselves to the cores _pinned left us
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  import ml_collections  # pylint: disable=import-outside-toplevel
  from contrastive import config  # pylint: disable=import-outside-toplevel
  from contrastive.data import pipeline  # pylint: disable=import-outside-toplevel
  from contrastive.data import tf_import  # pylint: disable=import-outside-toplevel
  from contrastive.methods import View  # pylint: disable=import-outside-toplevel
  data = config.base_config().data
  data.update({'source': 'folder', 'path': folder, 'image_size': size})
  aug = ml_collections.ConfigDict({'crop_area': CROP_AREA, 'crop_aspect': CROP_ASPECT,
                                   'flip_prob': FLIP_PROB})
  batches = pipeline.train_iterator(data, (View(aug, size),) * views, timing['batch_size'],
                                    seed=0, shard_index=0, shard_count=1,
                                    jpeg_windows=jpeg_windows)
  return {'windows': _rates(batches, **timing),
          'versions': {'tensorflow': tf_import.import_tensorflow().__version__}}


class _Views:
  """torchvision's usual training dataset: a PIL decode, then the transform once a view.

  A plain map-style dataset (``__getitem__`` and ``__len__``), so that this module
  imports torch only inside ``_torchvision``.
  """

  def __init__(self, paths, transform, views):
    self.paths, self.transform, self.views = paths, transform, views

  def __len__(self):
    return len(self.paths)

  def __getitem__(self, i):
    with Image.open(self.paths[i]) as image:
      image = image.convert('RGB')
    return tuple(self.transform(image) for _ in range(self.views))


class _EndlessShuffle:
  """Passes over ``range(length)`` in a new random order each, without end, so that
  one DataLoader iterator (and one set of workers) serves every timed window."""

  def __init__(self, length):
    self.length = length

  def __iter__(self):
    rng = np.random.default_rng(0)
    while True:
      yield from rng.permutation(self.length).tolist()


def _torchvision(paths: list[str], size: int, views: int, workers: int, timing: dict) -> dict:
  import torch  # pylint: disable=import-outside-toplevel
  import torchvision  # pylint: disable=import-outside-toplevel
  from torchvision import transforms  # pylint: disable=import-outside-toplevel
  transform = transforms.Compose([
      transforms.RandomResizedCrop(size, scale=CROP_AREA, ratio=CROP_ASPECT,
                                   interpolation=transforms.InterpolationMode.BICUBIC),
      transforms.RandomHorizontalFlip(FLIP_PROB),
      transforms.PILToTensor()])
  loader = torch.utils.data.DataLoader(_Views(paths, transform, views),
                                       batch_size=timing['batch_size'],
                                       sampler=_EndlessShuffle(len(paths)),
                                       num_workers=workers, drop_last=True)
  return {'windows': _rates(iter(loader), **timing),
          'versions': {'torch': torch.__version__, 'torchvision': torchvision.__version__}}


def _pinned(results, measure, kwargs) -> None:
  """Runs ``measure`` on ``kwargs['workers']`` of this machine's cores (all it has, if
  fewer)."""
  cores = sorted(os.sched_getaffinity(0))[:kwargs['workers']]
  os.sched_setaffinity(0, cores)
  results.put({**measure(**kwargs), 'cores': len(cores)})


def _in_own_process(measure, **kwargs) -> dict:
  """``measure(**kwargs)`` in a fresh pinned process: the threads and libraries one
  measurement loads cannot slow or crash the next."""
  context = multiprocessing.get_context('spawn')
  results = context.Queue()
  process = context.Process(target=_pinned, args=(results, measure, kwargs))
  process.start()
  while True:
    try:
      result = results.get(timeout=5)
      break
    except queue.Empty:
      if not process.is_alive():
        raise RuntimeError(f'{measure.__name__} failed (exit code {process.exitcode}); '
                           'see its error above.') from None
  process.join()
  return result


# ----------------------------------------------------------------------------- report

def _machine() -> dict:
  with open('/proc/cpuinfo') as f:
    models = [line.split(':', 1)[1].strip() for line in f if line.startswith('model name')]
  return {'cpu_model': models[0] if models else platform.processor(),
          'cpu_count': os.cpu_count(), 'usable_cores': len(os.sched_getaffinity(0)),
          'python': platform.python_version(), 'numpy': np.__version__,
          'pillow': Image.__version__, 'platform': platform.platform()}


def _table(rows: list[dict]) -> str:
  header = ('path', 'dataset', 'workers', 'images/s', 'images/s/core', 'ours/torchvision',
            'images/CPU-s', 'ours/torchvision (CPU)')
  lines = [header]
  for row in rows:
    ratios = [row[key] for key in ('ratio_to_torchvision', 'cpu_ratio_to_torchvision')]
    ratios = ['-' if ratio is None else f'{ratio:.2f}' for ratio in ratios]
    lines.append((row['path'], row['dataset'], str(row['workers']),
                  f"{row['images_per_s']:.0f}", f"{row['images_per_s_per_core']:.0f}",
                  ratios[0], f"{row['images_per_cpu_s']:.0f}", ratios[1]))
  widths = [max(len(line[c]) for line in lines) for c in range(len(header))]
  return '\n'.join('  '.join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip()
                   for line in lines)


def main(argv):
  del argv
  timing = {'batch_size': FLAGS.batch_size, 'warmup_batches': FLAGS.warmup_batches,
            'timed_images': FLAGS.timed_images, 'repeats': FLAGS.repeats}
  links = tempfile.mkdtemp(prefix='host_pipeline_cifar10_')
  try:
    cifar = _cifar_folder(FLAGS.path, FLAGS.max_images, links)
    synthetic = _synthetic_folder(FLAGS.synthetic_dir, FLAGS.synthetic_count)
    datasets = [(_describe('cifar10', cifar, 32), links, cifar),
                (_describe('synthetic 400-500 px', synthetic, 224), FLAGS.synthetic_dir,
                 synthetic)]
    rows, versions = [], {}
    for dataset, folder, paths in datasets:
      common = {'size': dataset['view_size'], 'views': FLAGS.views,
                'workers': FLAGS.workers, 'timing': timing}
      paths_to_time = {
          'ours, windowed decode': lambda: _in_own_process(
              _ours, folder=folder, jpeg_windows=True, **common),
          'ours, full decode': lambda: _in_own_process(
              _ours, folder=folder, jpeg_windows=False, **common)}
      if not FLAGS.skip_torch:
        paths_to_time['torchvision'] = lambda: _in_own_process(_torchvision, paths=paths,
                                                               **common)
      measured = {name: {'windows': []} for name in paths_to_time}
      for _ in range(FLAGS.rounds):   # the paths take turns: drift moves them alike
        for name, measure in paths_to_time.items():
          result = measure()
          measured[name]['windows'] += result['windows']
          measured[name]['cores'] = result['cores']
          versions.update(result['versions'])
      windows = {name: result['windows'] for name, result in measured.items()}
      medians = {name: {key: statistics.median(window[key] for window in w)
                        for key in ('images_per_s', 'images_per_cpu_s')}
                 for name, w in windows.items()}
      reference = medians.get('torchvision')
      for name, median in medians.items():
        cores = measured[name]['cores']
        rate, per_cpu_s = median['images_per_s'], median['images_per_cpu_s']
        mine = reference is not None and name != 'torchvision'
        rows.append({'path': name, 'dataset': dataset['name'], 'workers': FLAGS.workers,
                     'cores': cores, 'windows': windows[name], 'images_per_s': rate,
                     'images_per_s_per_core': rate / cores, 'images_per_cpu_s': per_cpu_s,
                     'ratio_to_torchvision': rate / reference['images_per_s'] if mine else None,
                     'cpu_ratio_to_torchvision': (per_cpu_s / reference['images_per_cpu_s']
                                                  if mine else None)})
  finally:
    shutil.rmtree(links)
  print(_table(rows))
  if FLAGS.json:
    report = {'command': ' '.join(sys.argv), 'timing': timing,
              'crop': {'area': CROP_AREA, 'aspect': CROP_ASPECT, 'flip_prob': FLIP_PROB,
                       'views_per_image': FLAGS.views, 'interpolation': 'bicubic'},
              'datasets': [d for d, _, _ in datasets], 'machine': {**_machine(), **versions},
              'results': rows}
    with open(FLAGS.json, 'w') as f:
      json.dump(report, f, indent=2)
    print(f'Wrote {FLAGS.json}')


if __name__ == '__main__':
  app.run(main)

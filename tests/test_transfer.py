"""Detection transfer end to end on a CPU: a pretrained ResNet-50 workdir, fine-tuned
by ``python -m contrastive.transfer`` with the VOC recipe on a detection set made
here (squares and disks on noisy canvases, boxes known, COCO json), evaluated by
detectron2's COCO evaluator; and the transfer's refusals.

Like tests/test_detectron2.py this runs detectron2 itself, in its own processes
(beside XLA, torch's native libraries can crash), and fails in CI without it.
"""

import glob
import json
import os
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from PIL import ImageDraw

from tests import conftest
from tests import test_detectron2
from tests.remote_fs import fake_gcs, remote_fs  # noqa: F401  pylint: disable=unused-import

RECIPE = 'configs/detection/voc_R_50_C4_24k.yaml'
ITERATIONS = 60
CLASSES = ('square', 'disk')
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_split(folder, name: str, count: int, seed: int, size: int = 96):
  """``count`` canvases of 1-2 filled squares and disks, 22-43 px, in COCO json."""
  rng = np.random.default_rng(seed)
  os.makedirs(folder / name)
  images, annotations = [], []
  for image_id in range(1, count + 1):
    picture = Image.fromarray(rng.integers(90, 140, (size, size, 3), dtype=np.uint8))
    draw = ImageDraw.Draw(picture)
    for _ in range(rng.integers(1, 3)):
      side = int(rng.integers(22, 44))
      x, y = (int(v) for v in rng.integers(0, size - side, 2))
      category = int(rng.integers(1, len(CLASSES) + 1))
      shape = draw.rectangle if CLASSES[category - 1] == 'square' else draw.ellipse
      shape([x, y, x + side, y + side], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
      annotations.append({'id': len(annotations) + 1, 'image_id': image_id,
                          'category_id': category, 'bbox': [x, y, side, side],
                          'area': side * side, 'iscrowd': 0})
    picture.save(folder / name / f'{image_id:03d}.png')
    images.append({'id': image_id, 'file_name': f'{image_id:03d}.png',
                   'width': size, 'height': size})
  (folder / f'{name}.json').write_text(json.dumps({
      'images': images, 'annotations': annotations,
      'categories': [{'id': i + 1, 'name': n} for i, n in enumerate(CLASSES)]}))
  return [name, str(folder / f'{name}.json'), str(folder / name)]


def _small(iterations: int) -> list[str]:
  """The recipe shrunk to the canvases and a CPU: the test's own overrides."""
  return ['DATASETS.TRAIN', "('train',)", 'DATASETS.TEST', "('val',)",
          'MODEL.ROI_HEADS.NUM_CLASSES', str(len(CLASSES)),
          'SOLVER.IMS_PER_BATCH', '4', 'SOLVER.MAX_ITER', str(iterations),
          'SOLVER.STEPS', '()', 'SOLVER.WARMUP_ITERS', '10', 'SOLVER.CHECKPOINT_PERIOD', '1000',
          'INPUT.MIN_SIZE_TRAIN', '(96,)', 'INPUT.MAX_SIZE_TRAIN', '96',
          'INPUT.MIN_SIZE_TEST', '96', 'INPUT.MAX_SIZE_TEST', '96',
          'MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE', '64', 'TEST.PRECISE_BN.NUM_ITER', '2',
          'DATALOADER.NUM_WORKERS', '0', 'SEED', '0']


def _transfer(pretrained, workdir, datasets, *arguments, overrides=()):
  command = [sys.executable, '-m', 'contrastive.transfer', f'--pretrained={pretrained}',
             f'--config={RECIPE}', f'--workdir={workdir}', *arguments]
  for dataset in datasets:
    command += ['--register_coco', *dataset]
  return subprocess.run([*command, *overrides], capture_output=True, text=True,
                        check=False, cwd=_REPO)


@pytest.fixture(scope='module', name='setup')
def fixture_setup(tmp_path_factory):
  """A pretrained ResNet-50 (1/8 width: detectron2 sets its widths from the file)
  and the detection set."""
  test_detectron2.require_detectron2()
  from contrastive import train  # pylint: disable=g-import-not-at-top
  config = conftest.tiny_config()
  config.model.name, config.model.width, config.model.stem = 'resnet50', 0.125, 'imagenet'
  config.data.image_size = 32
  config.num_epochs = 0.02
  pretrained = str(tmp_path_factory.mktemp('pretrained'))
  train.train_and_evaluate(config, pretrained)
  data = tmp_path_factory.mktemp('shapes')
  datasets = [_write_split(data, 'train', 64, seed=0), _write_split(data, 'val', 16, seed=1)]
  return pretrained, datasets, tmp_path_factory.mktemp('transfer')


def _metrics(workdir):
  return [json.loads(line) for line in (workdir / 'metrics.json').read_text().splitlines()]


_REFUSALS = """
import pickle, sys
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from contrastive import transfer

recipe, pretrained, folder = sys.argv[1:]
pkl = transfer.write_backbone(pretrained, folder)    # from the bucket
settings = transfer.backbone_settings(pkl)
print('width_per_group:', settings['MODEL.RESNETS.WIDTH_PER_GROUP'])
settings['MODEL.WEIGHTS'] = pkl
try:
  transfer.build_config(recipe, settings, ['MODEL.RESNETS.DEPTH', '101'], folder)
except ValueError as error:
  print('override:', error)
# The file without detectron2's suffix matching: its names match none of the model's.
with open(pkl, 'rb') as f:
  exact_names = {**pickle.load(f), 'matching_heuristics': False}
with open(folder + '/exact_names.pkl', 'wb') as f:
  pickle.dump(exact_names, f)
transfer._register_heads()
model = build_model(transfer.build_config(recipe, settings, [], folder))
DetectionCheckpointer(model).load(folder + '/exact_names.pkl')
try:
  transfer.check_backbone(model, pkl)
except RuntimeError as error:
  print('check:', error)
"""


def test_fine_tunes_the_exported_backbone_and_evaluates(setup, remote_fs, tmp_path):  # pylint: disable=redefined-outer-name
  """The fine-tune and evaluation; then, on the same pretrained run (one test, so
  that the suite's workers pretrain it once), the refusals and the run read from a
  bucket."""
  pretrained, datasets, folder = setup
  workdir = folder / 'voc_recipe'
  result = _transfer(pretrained, workdir, datasets, overrides=_small(ITERATIONS))
  assert result.returncode == 0, result.stderr[-3000:]
  log = (workdir / 'log.txt').read_text()
  # Iteration 0's network holds every tensor of the export, compared by value
  # (contrastive.transfer.check_backbone, which fails the run otherwise).
  assert 'Backbone: all 265 tensors of' in log
  metrics = _metrics(workdir)
  losses = [m['total_loss'] for m in metrics if 'total_loss' in m]
  print('total_loss every 20 iterations:', losses)
  # 1.85 -> 0.51 when written: the RPN and box losses of fresh heads fall fast.
  assert len(losses) == ITERATIONS // 20 and losses[-1] < 0.7 * losses[0], losses
  evaluation = [m for m in metrics if 'bbox/AP' in m]
  assert [m['iteration'] for m in evaluation] == [ITERATIONS]
  ap = evaluation[0]['bbox/AP']
  print('COCO evaluator on the held-out canvases, bbox AP / AP50:', ap,
        evaluation[0]['bbox/AP50'])
  assert np.isfinite(ap) and 0 <= ap <= 100
  assert (workdir / 'model_final.pth').is_file()

  # The same command with --eval_only evaluates the saved checkpoint: the same AP.
  again = _transfer(pretrained, workdir, datasets, '--eval_only',
                    overrides=_small(ITERATIONS))
  assert again.returncode == 0, again.stderr[-3000:]
  assert f'copypaste: {ap:.4f}' in (workdir / 'log.txt').read_text()

  # Another config in the same workdir is refused in one line, naming the field.
  changed = _transfer(pretrained, workdir, datasets, overrides=_small(ITERATIONS + 20))
  assert changed.returncode != 0
  assert changed.stderr.strip().splitlines()[-1].startswith('contrastive.transfer: ')
  assert 'SOLVER.MAX_ITER' in changed.stderr

  # --pretrained=gs://... (the local GCS emulator): the backbone read from the bucket
  # is the local one, under the same names; only the recorded source differs.
  from etils import epath  # pylint: disable=g-import-not-at-top
  for root, _, names in os.walk(pretrained):
    for name in names:
      local = os.path.join(root, name)
      with open(local, 'rb') as f:
        (epath.Path(remote_fs.url) / os.path.relpath(local, pretrained)).write_bytes(f.read())
  result = subprocess.run([sys.executable, '-c', _REFUSALS, RECIPE, remote_fs.url,
                           str(tmp_path)], capture_output=True, text=True, check=False,
                          cwd=_REPO, env=remote_fs.env)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(workdir / 'backbone.pkl', 'rb') as f:
    local = pickle.load(f)
  with open(tmp_path / 'backbone.pkl', 'rb') as f:
    bucket = pickle.load(f)
  assert remote_fs.url in bucket['__author__']
  assert local['model'].keys() == bucket['model'].keys() and len(local['model']) == 265
  assert all(np.array_equal(local['model'][k], bucket['model'][k]) for k in local['model'])

  # The refusals: an override of what the weights fix, and a model that did not
  # take the file's tensors.
  lines = dict(line.split(': ', 1) for line in result.stdout.splitlines()
               if line.startswith(('width_per_group:', 'override:', 'check:')))
  # The 1/8-width ResNet-50: 8 channels in res2's bottleneck, read from the file.
  assert lines['width_per_group'] == '8'
  assert lines['override'].startswith(
      'MODEL.RESNETS.DEPTH is set by the pretrained backbone (50)')
  # Init values that happen to equal the export's (unit BatchNorm scales, say) count
  # as loaded: what is checked is that the model holds the file's values.
  loaded = re.match(r'detectron2 loaded (\d+) of the 265 tensors of ', lines['check'])
  assert loaded and int(loaded.group(1)) < 200, lines['check']




_RECIPES = """
import sys
import torch
from detectron2.modeling import build_model
from contrastive import transfer

# A ResNet-50 at torchvision's widths, as backbone_settings reads it from its file.
settings = {'MODEL.RESNETS.DEPTH': 50, 'MODEL.RESNETS.STEM_OUT_CHANNELS': 64,
            'MODEL.RESNETS.RES2_OUT_CHANNELS': 256, 'MODEL.RESNETS.WIDTH_PER_GROUP': 64,
            'MODEL.RESNETS.NUM_GROUPS': 1, 'MODEL.RESNETS.STRIDE_IN_1X1': False,
            'INPUT.FORMAT': 'RGB', 'MODEL.WEIGHTS': ''}
transfer._register_heads()
for recipe in sys.argv[2:]:
  cfg = transfer.build_config(recipe, settings, [], sys.argv[1])
  model = build_model(cfg)
  norms = {type(m).__name__ for m in model.modules()
           if 'BatchNorm' in type(m).__name__ or type(m).__name__ in ('GroupNorm', 'LayerNorm')}
  print(recipe, cfg.MODEL.ROI_HEADS.NAME, cfg.SOLVER.MAX_ITER, cfg.MODEL.MASK_ON,
        ','.join(sorted(norms)), sum(p.numel() for p in model.parameters()))
"""


def test_every_recipe_builds_its_model(tmp_path):
  """Each recipe in configs/detection/ is a detectron2 config its model builds from,
  with trained synchronised BatchNorm throughout (no frozen statistics)."""
  test_detectron2.require_detectron2()
  recipes = sorted(glob.glob('configs/detection/[!B]*.yaml', root_dir=_REPO))
  assert len(recipes) == 5
  result = subprocess.run([sys.executable, '-c', _RECIPES, str(tmp_path), *recipes],
                          capture_output=True, text=True, check=False, cwd=_REPO)
  assert result.returncode == 0, result.stderr[-3000:]
  built = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()}
  assert set(built) == set(recipes)
  for recipe, (head, iterations, mask, norms, _) in built.items():
    assert norms == 'SyncBatchNorm', (recipe, norms)
    assert mask == str('coco' in recipe)
    assert head == ('Res5ROIHeadsWithNorm' if '_C4_' in recipe else 'StandardROIHeads')
    assert int(iterations) == {'24k': 24000, '1x': 90000, '2x': 180000}[
        recipe.rsplit('_', 1)[1][:-len('.yaml')]]

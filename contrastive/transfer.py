r"""Detection transfer: fine-tune a pretrained backbone in detectron2 and evaluate it.

    python -m contrastive.transfer --pretrained=/tmp/moco_v2 \
        --config=configs/detection/voc_R_50_C4_24k.yaml --workdir=/tmp/voc --num_gpus=8

``--pretrained`` is a training workdir (local or ``gs://``) whose backbone is a
ResNet with the imagenet stem. Its backbone is exported in the detectron2 format
(:func:`contrastive.export.detectron2_checkpoint`) to ``<workdir>/backbone.pkl``,
and the settings the weights fix are taken from the file and the run, so that the
recipe cannot disagree with them: the ResNet's depth and widths, the stride
layout (``STRIDE_IN_1X1 False``), ``INPUT.FORMAT RGB`` and ``MODEL.PIXEL_MEAN`` /
``PIXEL_STD`` (255 x the run's ``aug.mean`` / ``aug.std``). Before the first
iteration every tensor of the file is checked, by value, to be in the model:
detectron2 itself only logs the names it could not match, and trains on.

``--config`` is a detectron2 config file; the recipes are in ``configs/detection/``
(MoCo's VOC 07+12 R50-C4 recipe, COCO Mask R-CNN R50-C4 and R50-FPN at 1x and 2x).
Arguments after the flags are detectron2 overrides, ``KEY VALUE`` pairs as in
detectron2's own tools (``SOLVER.IMS_PER_BATCH 8 SOLVER.BASE_LR 0.01``).
detectron2 trains, evaluates the ``DATASETS.TEST`` sets with their evaluator
(VOC's or COCO's) and writes everything into ``--workdir``; the same command
again resumes from its last checkpoint. ``--register_coco NAME JSON IMAGE_ROOT``
names a dataset in COCO's json format (repeatable); the builtin VOC and COCO sets
are detectron2's, under ``$DETECTRON2_DATASETS``. ``--eval_only`` evaluates the
workdir's last checkpoint (or the bare exported backbone when there is none).

detectron2 is not on the package registries: install it as its documentation
says (``.ci/run`` shows the tests' setup). The checkpoint is read with JAX on the
CPU, so that JAX takes none of the GPUs' memory that detectron2 trains in.
"""

import argparse
import os
import pickle
import sys

try:
  import detectron2  # pylint: disable=unused-import
except ModuleNotFoundError as missing:
  raise ModuleNotFoundError(
      'contrastive.transfer runs detectron2, which is not installed (it is not on '
      'the package registries): see detectron2\'s installation docs.') from missing

import numpy as np
import torch
import yaml
from detectron2 import config as detectron2_config
from detectron2.data import datasets as detectron2_datasets
from detectron2.data import DatasetCatalog
from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultTrainer
from detectron2.engine import launch
from detectron2.evaluation import COCOEvaluator
from detectron2.evaluation import PascalVOCDetectionEvaluator
from detectron2.layers import get_norm
from detectron2.modeling import ROI_HEADS_REGISTRY
from detectron2.modeling.roi_heads import Res5ROIHeads
from detectron2.utils import comm
from detectron2.utils import logger as detectron2_logger
from detectron2.utils import env as detectron2_env

BACKBONE_FILE = 'backbone.pkl'
CONFIG_FILE = 'config.yaml'

# ResNet depth by blocks per stage, as detectron2's build_resnet_backbone knows them.
_DEPTHS = {(2, 2, 2, 2): 18, (3, 4, 6, 3): 34, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152}
_BOTTLENECK_DEPTHS = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152}


# ------------------------------------------------------------------- the ROI head

class Res5ROIHeadsWithNorm(Res5ROIHeads):
  """The C4 model's res5 head with one more norm on its output.

  Self-supervised features are not scaled like the supervised ones detectron2's
  recipes were tuned for; normalising the head's output (with the backbone's
  ``RESNETS.NORM``, trained) lets the new box predictor start from unit-scale
  features. This is the head of MoCo's detection transfer.
  """

  @classmethod
  def _build_res5_block(cls, cfg):
    res5, out_channels = super()._build_res5_block(cfg)
    res5.add_module(str(len(res5)), get_norm(cfg.MODEL.RESNETS.NORM, out_channels))
    return res5, out_channels


def _register_heads():
  if Res5ROIHeadsWithNorm.__name__ not in ROI_HEADS_REGISTRY:
    ROI_HEADS_REGISTRY.register(Res5ROIHeadsWithNorm)


# -------------------------------------------------------- the exported backbone

def write_backbone(pretrained_workdir: str, workdir: str, step: int | None = None) -> str:
  """Exports the pretrained run's backbone to ``<workdir>/backbone.pkl`` (written
  beside and renamed, so that a kill never leaves half a file)."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_platforms', 'cpu')
  from contrastive import export  # pylint: disable=g-import-not-at-top
  from contrastive import paths  # pylint: disable=g-import-not-at-top
  from contrastive import reader  # pylint: disable=g-import-not-at-top
  pretrained = reader.load_pretrained(pretrained_workdir, step)
  data = export.detectron2_checkpoint(
      pretrained, f'contrastive.transfer of {paths.resolve(pretrained_workdir)} '
      f'step {pretrained.step}')
  path = os.path.join(workdir, BACKBONE_FILE)
  os.makedirs(workdir, exist_ok=True)
  paths.write_atomically(paths.resolve(path), data)
  return path


def _exported_tensors(path: str) -> dict[str, np.ndarray]:
  with open(path, 'rb') as f:
    return pickle.load(f)['model']


def backbone_settings(path: str) -> dict:
  """The detectron2 config values the exported ResNet fixes, read from its shapes.

  ``MODEL.PIXEL_MEAN`` / ``PIXEL_STD`` and ``MODEL.WEIGHTS`` are added by
  :func:`build_config`, which knows the run.
  """
  tensors = _exported_tensors(path)
  if any(name.startswith(('l.', 'ab.')) for name in tensors):
    raise ValueError(f'{path}: a CMC backbone is two ResNets (of L and of ab); '
                     'detectron2 takes one RGB backbone.')
  blocks = tuple(len({name.split('.')[1] for name in tensors if name.startswith(f'res{s}.')})
                 for s in (2, 3, 4, 5))
  bottleneck = 'res2.0.conv3.weight' in tensors
  depths = _BOTTLENECK_DEPTHS if bottleneck else _DEPTHS
  if blocks not in depths:
    raise ValueError(f'{path}: a ResNet with {blocks} blocks per stage, which '
                     'detectron2 does not build (depth 18, 34, 50, 101 or 152).')
  stem = tensors['stem.conv1.weight'].shape[0]
  res2_out = tensors['res2.0.conv3.weight' if bottleneck else 'res2.0.conv2.weight'].shape[0]
  width_per_group = tensors['res2.0.conv1.weight'].shape[0]
  if not bottleneck and (stem, res2_out) != (64, 64):
    raise ValueError(f'{path}: ResNet-{depths[blocks]} of width {res2_out / 64:g}; '
                     'detectron2 builds ResNet-18/34 at width 1 only.')
  return {'MODEL.RESNETS.DEPTH': depths[blocks],
          'MODEL.RESNETS.STEM_OUT_CHANNELS': stem,
          'MODEL.RESNETS.RES2_OUT_CHANNELS': res2_out,
          'MODEL.RESNETS.WIDTH_PER_GROUP': width_per_group,
          'MODEL.RESNETS.NUM_GROUPS': 1,
          'MODEL.RESNETS.STRIDE_IN_1X1': False,
          'INPUT.FORMAT': 'RGB'}


def _pixel_normalisation(pretrained_workdir: str) -> dict:
  from contrastive import reader  # pylint: disable=g-import-not-at-top
  aug = reader.read_config(pretrained_workdir).aug
  mean = [0.0, 0.0, 0.0] if aug.mean is None else list(aug.mean)
  std = [1.0, 1.0, 1.0] if aug.std is None else list(aug.std)
  return {'MODEL.PIXEL_MEAN': [255.0 * m for m in mean],
          'MODEL.PIXEL_STD': [255.0 * s for s in std]}


def check_backbone(model: torch.nn.Module, path: str) -> int:
  """Every tensor of the exported file is in ``model``, by value; returns how many.

  detectron2 matches the file's names (``res2.0.conv1.weight``) to the model's
  that end with them (``backbone.res2.0.conv1.weight``, C4's
  ``roi_heads.res5...``, FPN's ``backbone.bottom_up...``).
  """
  state = getattr(model, 'module', model).state_dict()
  tensors = _exported_tensors(path)
  missing = []
  for name, value in tensors.items():
    places = [key for key in state if key == name or key.endswith('.' + name)]
    if len(places) != 1 or not torch.equal(
        state[places[0]].detach().cpu().float(), torch.from_numpy(np.asarray(value)).float()):
      missing.append(name)
  if missing:
    raise RuntimeError(
        f'detectron2 loaded {len(tensors) - len(missing)} of the {len(tensors)} tensors '
        f'of {path}; not in the model as exported: {", ".join(missing[:5])}'
        f'{" ..." if len(missing) > 5 else ""}. Its training would start from random '
        'weights there.')
  return len(tensors)


# ------------------------------------------------------------------------ config

def build_config(config_file: str, settings: dict, overrides: list[str], workdir: str):
  """``config_file`` with ``overrides``, then the backbone's ``settings``.

  An override of a setting the weights fix is an error rather than silently
  replaced.
  """
  if len(overrides) % 2:
    raise ValueError(f'detectron2 overrides come as KEY VALUE pairs; got {overrides}')
  cfg = detectron2_config.get_cfg()
  if not os.path.isfile(config_file):
    raise FileNotFoundError(f'--config={config_file} does not exist (the recipes '
                            'are in configs/detection/)')
  cfg.merge_from_file(config_file)
  cfg.merge_from_list(overrides)
  for key in overrides[::2]:
    if key in settings and not _equal(_get(cfg, key), settings[key]):
      raise ValueError(f'{key} is set by the pretrained backbone ({settings[key]!r}); '
                       'leave it out of the overrides.')
  cfg.merge_from_list([item for key, value in settings.items() for item in (key, value)])
  cfg.OUTPUT_DIR = workdir
  if not torch.cuda.is_available():
    cfg.MODEL.DEVICE = 'cpu'
  cfg.freeze()
  return cfg


def _get(cfg, key: str):
  for part in key.split('.'):
    cfg = cfg[part]
  return cfg


def _equal(a, b) -> bool:
  if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
    return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
  return a == b


def _keep_config(cfg) -> None:
  """Writes the workdir's config, or checks that a resumed run uses the same one."""
  path = os.path.join(cfg.OUTPUT_DIR, CONFIG_FILE)
  if os.path.exists(path):
    with open(path) as f:
      saved = _flat(yaml.safe_load(f) or {})
    changed = sorted(key for key, value in _flat(yaml.safe_load(cfg.dump())).items()
                     if saved.get(key) != value)
    if changed:
      raise ValueError(f'{path}: the run in {cfg.OUTPUT_DIR} was started with another '
                       f'config ({", ".join(changed[:5])}{" ..." if len(changed) > 5 else ""} '
                       'changed); resume it with its own command or pick another --workdir.')
    return
  from contrastive import paths  # pylint: disable=g-import-not-at-top
  paths.write_atomically(paths.resolve(path), cfg.dump())


def _flat(tree, prefix=''):
  if not isinstance(tree, dict):
    return {prefix[:-1]: tree}
  return {k: v for key, sub in tree.items() for k, v in _flat(sub, f'{prefix}{key}.').items()}


# ------------------------------------------------------------- train and evaluate

class _Trainer(DefaultTrainer):
  """detectron2's trainer with the evaluator each test set's metadata names."""

  @classmethod
  def build_evaluator(cls, cfg, dataset_name, output_folder=None):
    kind = MetadataCatalog.get(dataset_name).evaluator_type
    if kind == 'pascal_voc':
      return PascalVOCDetectionEvaluator(dataset_name)
    if kind == 'coco':
      return COCOEvaluator(dataset_name, output_dir=output_folder or os.path.join(
          cfg.OUTPUT_DIR, 'inference', dataset_name))
    raise ValueError(f'DATASETS.TEST: {dataset_name} has no VOC or COCO evaluator '
                     f'(its evaluator_type is {kind!r}).')


def _register(datasets):
  for name, json_file, image_root in datasets:
    if name not in DatasetCatalog:
      detectron2_datasets.register_coco_instances(name, {}, json_file, image_root)


def _fine_tune(cfg, datasets, eval_only: bool):
  """One process's part (detectron2's ``launch`` starts one per GPU)."""
  _register_heads()
  _register(datasets)
  # As detectron2's own tools: a negative SEED draws one.
  detectron2_env.seed_all_rng(None if cfg.SEED < 0 else cfg.SEED + comm.get_rank())
  for name in ('detectron2', 'contrastive'):
    log = detectron2_logger.setup_logger(output=cfg.OUTPUT_DIR,
                                         distributed_rank=comm.get_rank(), name=name)
  if eval_only:
    model = _Trainer.build_model(cfg)
    from detectron2.checkpoint import DetectionCheckpointer  # pylint: disable=g-import-not-at-top
    DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
        cfg.MODEL.WEIGHTS, resume=True)
    return _Trainer.test(cfg, model)
  trainer = _Trainer(cfg)
  trainer.resume_or_load(resume=True)
  if trainer.start_iter == 0:
    count = check_backbone(trainer.model, cfg.MODEL.WEIGHTS)
    log.info('Backbone: all %d tensors of %s are in the model, by value.', count,
             cfg.MODEL.WEIGHTS)
  else:
    log.info('Resuming from iteration %d.', trainer.start_iter)
  return trainer.train()


def transfer(pretrained_workdir: str, config_file: str, workdir: str,
             overrides: list[str] = (), datasets=(), num_gpus: int = 1,
             num_machines: int = 1, machine_rank: int = 0, dist_url: str = 'auto',
             eval_only: bool = False, step: int | None = None):
  """Exports ``pretrained_workdir``'s backbone and fine-tunes it with detectron2.

  ``datasets``: (name, json file, image root) triples of COCO-format sets to
  register. Returns detectron2's last evaluation results (process 0).
  """
  if '://' in workdir:
    raise ValueError(f'--workdir={workdir}: detectron2 writes its checkpoints and logs '
                     'with local file APIs; give a local folder.')
  workdir = os.path.abspath(workdir)
  path = write_backbone(pretrained_workdir, workdir, step)
  settings = {**backbone_settings(path), **_pixel_normalisation(pretrained_workdir),
              'MODEL.WEIGHTS': path}
  cfg = build_config(config_file, settings, list(overrides), workdir)
  _keep_config(cfg)
  return launch(_fine_tune, num_gpus, num_machines=num_machines, machine_rank=machine_rank,
                dist_url=dist_url, args=(cfg, tuple(datasets), eval_only))


# ----------------------------------------------------------------- command line

def _arguments(argv):
  parser = argparse.ArgumentParser(
      prog='python -m contrastive.transfer', description=__doc__.split('\n\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--pretrained', required=True, help='Workdir of a pretraining run.')
  parser.add_argument('--config', required=True, help='detectron2 config file '
                      '(configs/detection/).')
  parser.add_argument('--workdir', required=True, help='Where detectron2 writes; '
                      'the same command again resumes.')
  parser.add_argument('--step', type=int, default=None,
                      help='Pretraining checkpoint step; default: the latest.')
  parser.add_argument('--register_coco', nargs=3, action='append', default=[],
                      metavar=('NAME', 'JSON', 'IMAGE_ROOT'),
                      help='A dataset in COCO json format (repeatable).')
  parser.add_argument('--num_gpus', type=int, default=1, help='GPUs of this machine.')
  parser.add_argument('--num_machines', type=int, default=1)
  parser.add_argument('--machine_rank', type=int, default=0)
  parser.add_argument('--dist_url', default='auto',
                      help='Rendezvous of the machines, tcp://HOST:PORT.')
  parser.add_argument('--eval_only', action='store_true',
                      help='Evaluate the last checkpoint instead of training.')
  parser.add_argument('overrides', nargs=argparse.REMAINDER,
                      help='detectron2 config overrides: KEY VALUE ...')
  return parser.parse_args(argv)


def main(argv=None):
  arguments = _arguments(sys.argv[1:] if argv is None else argv)
  try:
    transfer(arguments.pretrained, arguments.config, arguments.workdir,
             arguments.overrides, arguments.register_coco, arguments.num_gpus,
             arguments.num_machines, arguments.machine_rank, arguments.dist_url,
             arguments.eval_only, arguments.step)
  except (ValueError, FileNotFoundError) as error:
    sys.exit(f'contrastive.transfer: {error}')


if __name__ == '__main__':
  main()

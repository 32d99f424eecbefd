r"""Export the pretrained backbone of a training workdir to other frameworks.

    python -m contrastive.export --workdir=/tmp/quickstart --format=torchvision \
        --out=/tmp/quickstart/resnet.safetensors

``--format`` is ``flax`` (one msgpack file, read back by :func:`load_flax_encoder`),
``torchvision`` (safetensors with torchvision ResNet names), ``detectron2`` (a
.pkl for detectron2's checkpointer) or ``timm`` (safetensors with timm's
VisionTransformer names, for a ViT backbone); ``--step`` picks a checkpoint other
than the latest. An existing ``--out`` file is replaced only with ``--overwrite``
(in Python, ``overwrite=True``); the file is written beside it and renamed into
place, so a killed export leaves the previous file or none, never a part (a
bucket URL is written directly: an object store makes an object only once it is
whole). Only the backbone (the one the run's method names) is exported,
no method state; ``--head_layers=k`` adds the projection head's first k hidden
layers (SimCLR v2 fine-tunes from the first). In Python, each ``export_*`` also
takes ``method=``, the run's :class:`~contrastive.methods.Method` when it is
not one of the library's. Reading a run is
:mod:`contrastive.reader`'s (:func:`~contrastive.reader.load_pretrained`,
:func:`~contrastive.reader.encode`); the names of the other frameworks are
:mod:`contrastive.formats`'.

The exported network expects what it was trained on: RGB in [0, 1], then
``(x - config.aug.mean) / config.aug.std`` when the run set them (the digits and
CIFAR recipes do not normalise at all). Each format records these values.

CMC runs have two backbones, a ResNet of the L channel and one of the ab
channels of CIE Lab (:mod:`contrastive.models.lab_split`). The Flax encoder is
the pair: it takes RGB as above and does the Lab conversion itself. The
torchvision and detectron2 state dicts hold both ResNets, every name prefixed
with its view: ``l.`` (``l.conv1.weight`` has 1 input channel) and ``ab.`` (2
input channels), each prefix one ResNet of half ``model.width``
(``model.width=2`` gives torchvision's own widths). Their input is Lab of the
sRGB image under the D65 white, ``(Lab - offset) / scale`` with the offset and
scale in the safetensors metadata's ``input.lab`` (L / 50 - 1 for ``l.``;
a / 110, b / 110 for ``ab.``); the features are L's and then ab's concatenated.
"""

import dataclasses
import importlib
import io
import json
import pickle

import flax.linen as nn
import flax.serialization
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags

from contrastive import command_line
from contrastive import models
from contrastive import paths
from contrastive import reader
from contrastive.formats import torch_resnet
from contrastive.models import heads
from contrastive.models import lab_split
from contrastive.models import resnet

FORMATS = ('flax', 'torchvision', 'detectron2', 'timm')
_FLAX_FORMAT = 'contrastive.flax_encoder'


def _input_normalization(config) -> dict:
  """Mean and std applied after scaling to [0, 1] (None: no normalisation)."""
  return {'mean': None if config.aug.mean is None else list(config.aug.mean),
          'std': None if config.aug.std is None else list(config.aug.std)}


def _torch_input(pretrained: reader.Pretrained) -> dict:
  """What the state dicts' networks take: a Lab pair's add the Lab conversion."""
  described = _input_normalization(pretrained.config)
  encoder = pretrained.encoder
  if isinstance(getattr(encoder, 'encoder', encoder), lab_split.LabSplitEncoder):
    described['lab'] = {'white': 'D65', 'offset': list(lab_split.LAB_OFFSET),
                        'scale': list(lab_split.LAB_SCALE),
                        'channels': {'l.': 'L', 'ab.': 'a, b'}}
  return described


# ----------------------------------------------------------------------------- output

def _check_out(out_path: str, overwrite: bool):
  """``out_path`` resolved, refused in one line where it cannot take the export."""
  out = paths.resolve(out_path)
  if out.is_dir():
    raise ValueError(f'--out={out_path} is a directory: give the path of the file to '
                     'write (in it, or elsewhere).')
  if not paths.is_url(out) and not out.parent.is_dir():
    missing = 'is not a directory' if out.parent.exists() else 'does not exist'
    raise FileNotFoundError(f'--out={out_path}: the folder {out.parent} {missing}; create '
                            'it or choose another --out.')
  if not overwrite and out.exists():
    raise ValueError(f'--out={out_path} exists: pass --overwrite to replace it, or choose '
                     'another --out.')
  return out


def _load(workdir: str, out_path: str, overwrite: bool, step: int | None = None,
          head_layers: int = 0, method=None) -> reader.Pretrained:
  """The run's backbone, once ``--out`` and ``--head_layers`` are known to fit, so
  that a wrong one fails before the checkpoint is read."""
  _check_out(out_path, overwrite)
  if head_layers < 0:
    raise ValueError(f'--head_layers={head_layers}: give 0 (the encoder alone) or more.')
  return reader.load_pretrained(workdir, step, head_layers, method)


def _write(out_path: str, data: bytes, overwrite: bool) -> None:
  """``data`` at ``out_path``, whole or not at all (:func:`paths.write_atomically`)."""
  out = _check_out(out_path, overwrite)    # again: a file may have appeared since
  try:
    paths.write_atomically(out, data)
  except OSError as err:
    raise ValueError(f'--out={out_path} cannot be written: {err.strerror or err}; choose '
                     'another --out.') from err


# ----------------------------------------------------------------------------- flax

def export_flax(workdir: str, out_path: str, step: int | None = None,
                head_layers: int = 0, method=None, overwrite: bool = False) -> None:
  """One msgpack file: the backbone module (its class and fields), the run's model
  config, input normalisation and the variables."""
  pretrained = _load(workdir, out_path, overwrite, step, head_layers, method)
  payload = {
      'format': _FLAX_FORMAT,
      'module': _describe_module(pretrained.encoder),
      'method': pretrained.config.method,
      'model': json.dumps(pretrained.config.model.to_dict()),   # the run's, as JSON
      'input': _input_normalization(pretrained.config),
      'step': pretrained.step,
      'variables': pretrained.variables,
  }
  _write(out_path, flax.serialization.msgpack_serialize(payload), overwrite)


def load_flax_encoder(path: str) -> tuple:
  """``(module, variables)`` from :func:`export_flax`'s file; flax and jax only.

  Features: ``module.apply(variables, images, train=False)`` on images prepared as
  the file's ``input`` entry says (``flax.serialization.msgpack_restore`` reads
  the whole file as a dict).
  """
  payload = flax.serialization.msgpack_restore(paths.resolve(path).read_bytes())
  if not isinstance(payload, dict) or payload.get('format') != _FLAX_FORMAT:
    raise ValueError(f'{path} is not a file written by contrastive.export.export_flax.')
  if 'module' not in payload:
    return _older_flax_module(payload['model']), payload['variables']
  return _build_module(payload['module'], path), payload['variables']


def _describe_module(module) -> dict:
  """A Flax module as its class and dataclass fields, nested modules included."""
  def value(field, v):
    if isinstance(v, nn.Module):
      return {'module': _describe_module(v)}
    if isinstance(v, (tuple, list)):
      return {'tuple': [value(field, x) for x in v]}
    if isinstance(getattr(v, 'dtype', None), np.dtype) or isinstance(v, np.dtype):
      return {'dtype': np.dtype(getattr(v, 'dtype', v)).name}
    if isinstance(v, type):
      return {'class': f'{v.__module__}:{v.__qualname__}'}
    if v is None or isinstance(v, (bool, int, float, str)):
      return {'value': v}
    raise ValueError(f'{type(module).__name__}.{field}={v!r} cannot be written to a flax '
                     'export file.')
  fields = {f.name: value(f.name, getattr(module, f.name))
            for f in dataclasses.fields(module) if f.name not in ('parent', 'name')}
  return {'class': f'{type(module).__module__}:{type(module).__qualname__}',
          'fields': fields}


def _class(name: str, path: str):
  module_name, qualname = name.split(':')
  if not module_name.startswith('contrastive.'):
    raise ValueError(f'{path} names the class {name}, which is not contrastive\'s.')
  return getattr(importlib.import_module(module_name), qualname)


def _build_module(described: dict, path: str):
  def value(v):
    if 'module' in v:
      return _build_module(v['module'], path)
    if 'tuple' in v:
      return tuple(value(x) for x in v['tuple'])
    if 'dtype' in v:
      return jnp.dtype(v['dtype'])
    if 'class' in v:
      return _class(v['class'], path)
    return v['value']
  return _class(described['class'], path)(
      **{name: value(v) for name, v in described['fields'].items()})


def _older_flax_module(model: dict):
  """The module of a file from before modules were described by class: a ResNet,
  CMC's pair, or either with head layers."""
  stage_sizes, block = resnet.ARCHITECTURES[model['name']]
  kind = lab_split.LabSplitEncoder if model.get('lab_split') else resnet.ResNet
  module = kind(stage_sizes=stage_sizes, block=block, width=model['width'],
                stem=model['stem'], bn_momentum=model['bn_momentum'])
  head = model.get('head_layers')
  if head:
    module = models.EncoderWithHeadLayers(module, heads.HiddenLayers(
        num_layers=head['num_layers'], hidden_dim=head['hidden_dim'], use_bn=head['use_bn'],
        bn_momentum=model['bn_momentum']))
  return module


# ------------------------------------------------------------------------ torchvision

def export_torchvision(workdir: str, out_path: str, step: int | None = None,
                       head_layers: int = 0, method=None, overwrite: bool = False) -> None:
  """:func:`contrastive.formats.torch_resnet.torchvision_state_dict` as
  safetensors; metadata: model and input.

  Read it with ``safetensors.torch.load_file(out_path)``; the metadata
  (``safetensors.safe_open(out_path, 'pt').metadata()``) holds ``model`` and
  ``input`` as JSON strings.
  """
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  pretrained = _load(workdir, out_path, overwrite, step, head_layers, method)
  _write(out_path, safetensors.numpy.save(
      torch_resnet.torchvision_state_dict(pretrained),
      metadata={'model': json.dumps(pretrained.config.model.to_dict()),
                'input': json.dumps(_torch_input(pretrained)),
                'step': str(pretrained.step)}), overwrite)


# ------------------------------------------------------------------------------ timm

def export_timm(workdir: str, out_path: str, step: int | None = None,
                head_layers: int = 0, method=None, overwrite: bool = False) -> None:
  """A ViT backbone as safetensors under timm's names; metadata: the
  ``timm.create_model`` name or keyword arguments that build its network, the
  model config and input (see :mod:`contrastive.formats.timm`)."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  from contrastive.formats import timm  # pylint: disable=g-import-not-at-top
  from contrastive.models import vit  # pylint: disable=g-import-not-at-top
  if head_layers:
    raise ValueError('--head_layers: the timm format holds the ViT backbone only; export '
                     'head layers in the flax format.')
  pretrained = _load(workdir, out_path, overwrite, step, method=method)
  if not isinstance(pretrained.encoder, vit.VisionTransformer):
    raise ValueError(f'--format=timm takes a ViT backbone; this run\'s is a '
                     f'{type(pretrained.encoder).__name__} (model.name='
                     f'{pretrained.config.model.name!r}): use --format=torchvision.')
  size = pretrained.config.data.image_size
  _write(out_path, safetensors.numpy.save(
      timm.timm_state_dict(pretrained.encoder, pretrained.variables, size),
      metadata={'timm_model': json.dumps(timm.timm_model_name(pretrained.encoder, size)),
                'timm_kwargs': json.dumps(timm.timm_kwargs(pretrained.encoder, size)),
                'model': json.dumps(pretrained.config.model.to_dict()),
                'input': json.dumps(_input_normalization(pretrained.config)),
                'step': str(pretrained.step)}), overwrite)


# ------------------------------------------------------------------------- detectron2

class _PortablePickler(pickle.Pickler):
  """Pickles arrays as ``numpy.ndarray(shape, dtype, buffer)``.

  NumPy 2's own reduction names ``numpy._core``, which NumPy 1.x (common in
  detectron2 environments) cannot import; ``numpy.ndarray`` exists in both.
  """

  def reducer_override(self, obj):
    if isinstance(obj, np.ndarray):
      data = bytearray(np.ascontiguousarray(obj).tobytes())   # writable on load
      return np.ndarray, (obj.shape, obj.dtype.str, data)
    return NotImplemented


def detectron2_checkpoint(pretrained: reader.Pretrained, source: str) -> bytes:
  """The pickled checkpoint of :func:`export_detectron2` (``source``: what it was
  exported from, detectron2 logs it).

  The names are those of detectron2's bare ResNet (``stem.conv1``, ``res2`` ...
  ``res5``); in a detection model the backbone sits under ``backbone.`` (C4:
  ``res5`` under ``roi_heads.``) or ``backbone.bottom_up.`` (FPN). With
  ``matching_heuristics`` detectron2's checkpointer matches each file name to the
  model name it ends with, so one file serves every such model (MoCo's
  conversion script writes the same flag); without it, exact names are needed
  and detectron2 loads none of these, only logging that they were not used.
  """
  state = {'model': torch_resnet.detectron2_state_dict(pretrained),
           '__author__': source, 'matching_heuristics': True}
  buffer = io.BytesIO()
  _PortablePickler(buffer, protocol=4).dump(state)
  return buffer.getvalue()


def export_detectron2(workdir: str, out_path: str, step: int | None = None,
                      head_layers: int = 0, method=None, overwrite: bool = False) -> None:
  """A .pkl that detectron2's ``DetectionCheckpointer`` loads into its detection
  models' ResNet (Faster / Mask R-CNN, C4 or FPN): see :func:`detectron2_checkpoint`.

  Config to match it: ``MODEL.WEIGHTS=<out_path>``, ``MODEL.RESNETS.DEPTH`` the
  depth (18, 34, 50, 101 or 152; detectron2 has no 10), ``MODEL.RESNETS.STRIDE_IN_1X1
  False`` (v1.5 layout), ``INPUT.FORMAT 'RGB'``, ``MODEL.PIXEL_MEAN`` and
  ``MODEL.PIXEL_STD`` = 255 x the run's ``aug.mean`` / ``aug.std`` (0 and 255 when
  the run did not normalise). ResNet-18/34 need ``RES2_OUT_CHANNELS 64`` and
  width 1 (detectron2 fixes their channels). Bottleneck nets of ``model.width``
  w != 1 need ``STEM_OUT_CHANNELS`` = ``WIDTH_PER_GROUP`` = int(64 w) and
  ``RES2_OUT_CHANNELS`` = 4 int(64 w).
  """
  pretrained = _load(workdir, out_path, overwrite, step, head_layers, method)
  source = f'contrastive.export of {paths.resolve(workdir)} step {pretrained.step}'
  _write(out_path, detectron2_checkpoint(pretrained, source), overwrite)


# ----------------------------------------------------------------------- command line

EXPORTERS = {'flax': export_flax, 'torchvision': export_torchvision,
             'detectron2': export_detectron2, 'timm': export_timm}


def _run(argv):
  values = flags.FLAGS
  command_line.run(argv, lambda: EXPORTERS[values.format](
      values.workdir, values.out, values.step, values.head_layers,
      overwrite=values.overwrite))
  print(f'Wrote {values.out} ({values.format}).')


def main():
  """``python -m contrastive.export``.

  The flags are defined here rather than at import, so that programs importing
  this module keep their own ``--workdir``.
  """
  flags.DEFINE_string('workdir', None, 'Workdir of a training run.')
  flags.DEFINE_enum('format', None, FORMATS, 'What to write.')
  flags.DEFINE_string('out', None, 'Output file.')
  flags.DEFINE_bool('overwrite', False, 'Replace --out if it exists.')
  flags.DEFINE_integer('step', None, 'Checkpoint step; default: the latest.')
  flags.DEFINE_integer('head_layers', 0, 'Hidden layers of the projection head to '
                       'export on top of the encoder (SimCLR v2: 1); not detectron2 or timm.')
  flags.mark_flags_as_required(['workdir', 'format', 'out'])
  app.run(_run)


if __name__ == '__main__':
  main()

r"""The pretrained encoder of a training workdir: load it, encode images, export it.

    python -m contrastive.export --workdir=/tmp/quickstart --format=torchvision \
        --out=/tmp/quickstart/resnet.safetensors

``--format`` is ``flax`` (one msgpack file, read back by :func:`load_flax_encoder`),
``torchvision`` (safetensors with torchvision ResNet names) or ``detectron2`` (a
.pkl for detectron2's checkpointer); ``--step`` picks a checkpoint other than the
latest. Only the backbone is exported, no method state; ``--head_layers=k`` adds
the projection head's first k hidden layers (SimCLR v2 fine-tunes from the first).

In Python, :func:`load_pretrained` gives the config, the Flax encoder and its
variables, and :func:`encode` gives features of images.

The exported network expects what it was trained on: RGB in [0, 1], then
``(x - config.aug.mean) / config.aug.std`` when the run set them (the digits and
CIFAR recipes do not normalise at all). Each format records these values.

CMC runs (``config.method='cmc'``) have two backbones, a ResNet of the L channel
and one of the ab channels of CIE Lab (:mod:`contrastive.models.lab_split`). The
Flax encoder is the pair: it takes RGB as above and does the Lab conversion
itself. The torchvision and detectron2 state dicts hold both ResNets, every name
prefixed with its view: ``l.`` (``l.conv1.weight`` has 1 input channel) and
``ab.`` (2 input channels), each prefix one ResNet of half ``model.width``
(``model.width=2`` gives torchvision's own widths). Their input is Lab of the
sRGB image under the D65 white, ``(Lab - offset) / scale`` with the offset and
scale in the safetensors metadata's ``input.lab`` (L / 50 - 1 for ``l.``;
a / 110, b / 110 for ``ab.``); the features are L's and then ab's concatenated.

Orbax and the config schema are imported inside the functions that read a
workdir, so that :func:`load_flax_encoder` needs only flax and jax.
"""

import functools
import io
import json
import pickle
from typing import Any, NamedTuple

import flax.serialization
import jax
import numpy as np
from absl import app
from absl import flags

from contrastive import command_line
from contrastive import models
from contrastive import paths
from contrastive.models import heads
from contrastive.models import lab_split
from contrastive.models import resnet

FORMATS = ('flax', 'torchvision', 'detectron2')
_FLAX_FORMAT = 'contrastive.flax_encoder'


class Pretrained(NamedTuple):
  """The encoder of a run, and the config that trained it."""
  config: Any           # ml_collections.ConfigDict with every field of base_config()
  encoder: Any          # resnet.ResNet, lab_split.LabSplitEncoder or models.EncoderWithHeadLayers
  variables: dict       # {'params', 'batch_stats'} of the encoder, numpy arrays
  step: int


# ----------------------------------------------------------------------------- load

def load_pretrained(workdir: str, step: int | None = None, head_layers: int = 0) -> Pretrained:
  """The encoder of ``workdir``'s checkpoint at ``step`` (default: the latest),
  with the first ``head_layers`` hidden layers of its projection head on top
  (:func:`with_head_layers`).

  Only the encoder's params and BatchNorm statistics are read, as host numpy
  arrays, so the method state (queues, EMA targets), optimizer state and the
  sharding of the run (any number of devices) do not matter. The encoder has no
  BatchNorm axis name: it runs, and fine-tunes, outside any mesh.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from contrastive import config as config_lib  # pylint: disable=g-import-not-at-top

  config_path = paths.resolve(workdir) / 'config.json'
  if not config_path.is_file():
    raise FileNotFoundError(f'{config_path} does not exist: {workdir} is not the '
                            'workdir of a training run.')
  saved = json.loads(config_path.read_text())
  if 'method' not in saved:
    raise ValueError(f'{config_path} is not the config of a pretraining run (it has no '
                     '"method"): point at the workdir of contrastive.main.')
  # Onto the schema, so fields added since the run exist with their defaults.
  config = config_lib.base_config()
  config.update(saved)

  directory = paths.resolve(workdir) / 'checkpoints'
  if not directory.is_dir():
    raise FileNotFoundError(f'{directory} does not exist: the run in {workdir} saved '
                            'no checkpoint yet.')
  manager = ocp.CheckpointManager(
      directory, item_handlers=ocp.PyTreeCheckpointHandler(),
      options=ocp.CheckpointManagerOptions(read_only=True, create=False,
                                           save_interval_steps=0))
  try:
    steps = manager.all_steps()
    if not steps:
      raise FileNotFoundError(f'{directory} holds no complete checkpoint.')
    if step is None:
      step = max(steps)
    elif step not in steps:
      raise FileNotFoundError(f'{directory} has no checkpoint of step {step}; it has '
                              f'steps {", ".join(map(str, sorted(steps)))}.')
    saved_tree = manager.item_metadata(step).tree
    # Partial restore of the encoder subtrees; restore_type=np.ndarray ignores
    # the shardings recorded at save time, so any device count can read them.
    item = {collection: {'encoder': jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype),
        saved_tree[collection]['encoder'])}
            for collection in ('params', 'batch_stats')}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                item)
    restored = manager.restore(step, args=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True))
  finally:
    manager.close()
  build = lab_split.build_encoder if config.method == 'cmc' else models.build_encoder
  encoder = build(config.model).clone(bn_axis_name=None)
  variables = {collection: restored[collection]['encoder']
               for collection in ('params', 'batch_stats')}
  pretrained = Pretrained(config=config, encoder=encoder, variables=variables, step=int(step))
  return with_head_layers(pretrained, workdir, head_layers) if head_layers else pretrained


def check_head_layers(head_layers: int, head,
                      method: str = '') -> None:
  """``config.head_layers`` against the pretraining run's head config (and
  ``method``), before any of its arrays is read."""
  if head_layers and method == 'cmc':
    raise ValueError(f'config.head_layers={head_layers}; a CMC run has one projection '
                     'head per view (head/l, head/ab), so only config.head_layers=0 '
                     '(both encoders\' features, concatenated) fits it.')
  hidden = head.num_layers - 1
  if head_layers <= hidden:
    return
  if not hidden:
    raise ValueError(f'config.head_layers={head_layers}; the pretraining run\'s '
                     f'projection head (head.num_layers={head.num_layers}) has no hidden '
                     'layer: only config.head_layers=0 (the encoder\'s features) fits it.')
  raise ValueError(f'config.head_layers={head_layers}; the pretraining run\'s '
                   f'projection head (head.num_layers={head.num_layers}) has {hidden} '
                   f'hidden layer(s): valid 0 to {hidden}.')


def read_head_layers(workdir: str, step: int, num_layers: int) -> dict:
  """``{'params', 'batch_stats'}`` (the latter only with BN) of the first
  ``num_layers`` hidden layers of the projection head in ``workdir``'s checkpoint
  of ``step``, as host numpy arrays: a partial restore, like the encoder's in
  :func:`load_pretrained`, so the device count of the run and
  the rest of its state do not matter."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  names = {f'{kind}_{i}' for kind in ('Dense', 'BatchNorm') for i in range(num_layers)}
  directory = paths.resolve(workdir) / 'checkpoints'
  manager = ocp.CheckpointManager(
      directory, item_handlers=ocp.PyTreeCheckpointHandler(),
      options=ocp.CheckpointManagerOptions(read_only=True, create=False,
                                           save_interval_steps=0))
  try:
    saved = manager.item_metadata(step).tree
    missing = sorted(f'Dense_{i}' for i in range(num_layers)
                     if f'Dense_{i}' not in saved['params'].get('head', {}))
    if missing:
      raise ValueError(f'config.head_layers={num_layers}; the checkpoint of step {step} '
                       f'in {directory} has no {", ".join(missing)} under params["head"]: '
                       'its method has no single projection head to keep layers of.')
    item = {}
    for collection in ('params', 'batch_stats'):
      layers = {name: jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype),
                                   layer)
                for name, layer in saved[collection].get('head', {}).items() if name in names}
      if layers:
        item[collection] = {'head': layers}
    restored = manager.restore(step, args=ocp.args.PyTreeRestore(
        item=item, partial_restore=True,
        restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)))
  finally:
    manager.close()
  return {collection: tree['head'] for collection, tree in restored.items()}


def with_head_layers(pretrained: Pretrained, workdir: str, head_layers: int) -> Pretrained:
  """``pretrained`` with the first ``head_layers`` hidden layers of its run's
  projection head on top of the encoder (SimCLR v2 fine-tunes from the first),
  read from the same checkpoint; variables nest ``encoder`` and ``head``."""
  check_head_layers(head_layers, pretrained.config.head, pretrained.config.method)
  head = models.build_model(pretrained.config.model, pretrained.config.head).head
  layers = heads.hidden_layers(head, head_layers).clone(bn_axis_name=None)
  head_variables = read_head_layers(workdir, pretrained.step, head_layers)
  variables = {collection: {'encoder': pretrained.variables[collection],
                            **({'head': head_variables[collection]}
                               if collection in head_variables else {})}
               for collection in ('params', 'batch_stats')}
  return pretrained._replace(encoder=models.EncoderWithHeadLayers(pretrained.encoder, layers),
                             variables=variables)


@functools.partial(jax.jit, static_argnums=0)
def _features(encoder, variables, pixels):
  return encoder.apply(variables, pixels, train=False)


def encode(pretrained: Pretrained, images, batch_size: int = 256) -> np.ndarray:
  """Encoder features [N, num_features] of NHWC images, as the trainer evaluates.

  ``images``: uint8 in [0, 255], or floats in [0, 1], at the training resolution
  (``config.data.image_size``). They get the trainer's evaluation preprocessing
  and BatchNorm runs on its running statistics. Batches are padded to
  ``batch_size`` so that one compilation serves every call.
  """
  from contrastive.data import augment  # pylint: disable=g-import-not-at-top
  images = np.asarray(images)
  if images.dtype != np.uint8:
    images = images.astype(np.float32) * 255.0   # preprocess_eval divides by 255
  variables = jax.device_put(pretrained.variables)   # once, not once a batch
  features = [np.zeros((0, pretrained.encoder.num_features), np.float32)]
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    padded = np.pad(chunk, [(0, batch_size - len(chunk))] + [(0, 0)] * 3)
    pixels = augment.preprocess_eval(padded, pretrained.config.aug)
    features.append(np.asarray(
        _features(pretrained.encoder, variables, pixels))[:len(chunk)])
  return np.concatenate(features)


def _input_normalization(config) -> dict:
  """Mean and std applied after scaling to [0, 1] (None: no normalisation)."""
  return {'mean': None if config.aug.mean is None else list(config.aug.mean),
          'std': None if config.aug.std is None else list(config.aug.std)}


def _torch_input(config) -> dict:
  """What the state dicts' ResNets take: CMC's add the Lab conversion."""
  described = _input_normalization(config)
  if config.method == 'cmc':
    described['lab'] = {'white': 'D65', 'offset': list(lab_split.LAB_OFFSET),
                        'scale': list(lab_split.LAB_SCALE),
                        'channels': {'l.': 'L', 'ab.': 'a, b'}}
  return described


# ----------------------------------------------------------------------------- flax

def export_flax(workdir: str, out_path: str, step: int | None = None,
                head_layers: int = 0) -> None:
  """One msgpack file: the model description, input normalisation and variables."""
  pretrained = load_pretrained(workdir, step, head_layers)
  model = pretrained.config.model
  head = None
  if head_layers:
    layers = pretrained.encoder.head
    head = {'num_layers': layers.num_layers, 'hidden_dim': layers.hidden_dim,
            'use_bn': layers.use_bn}
  payload = {
      'format': _FLAX_FORMAT,
      'model': {'name': model.name, 'width': model.width, 'stem': model.stem,
                'bn_momentum': model.bn_momentum,
                'lab_split': isinstance(pretrained.encoder, lab_split.LabSplitEncoder),
                'head_layers': head},
      'input': _input_normalization(pretrained.config),
      'step': pretrained.step,
      'variables': pretrained.variables,
  }
  paths.resolve(out_path).write_bytes(flax.serialization.msgpack_serialize(payload))


def load_flax_encoder(path: str) -> tuple[resnet.ResNet | lab_split.LabSplitEncoder, dict]:
  """``(module, variables)`` from :func:`export_flax`'s file; flax and jax only.

  Features: ``module.apply(variables, images, train=False)`` on images prepared as
  the file's ``input`` entry says (``flax.serialization.msgpack_restore`` reads
  the whole file as a dict).
  """
  payload = flax.serialization.msgpack_restore(paths.resolve(path).read_bytes())
  if not isinstance(payload, dict) or payload.get('format') != _FLAX_FORMAT:
    raise ValueError(f'{path} is not a file written by contrastive.export.export_flax.')
  model = payload['model']
  stage_sizes, block = resnet.ARCHITECTURES[model['name']]
  kind = lab_split.LabSplitEncoder if model.get('lab_split') else resnet.ResNet
  module = kind(stage_sizes=stage_sizes, block=block, width=model['width'],
                stem=model['stem'], bn_momentum=model['bn_momentum'])
  head = model.get('head_layers')
  if head:
    module = models.EncoderWithHeadLayers(module, heads.HiddenLayers(
        num_layers=head['num_layers'], hidden_dim=head['hidden_dim'], use_bn=head['use_bn'],
        bn_momentum=model['bn_momentum']))
  return module, payload['variables']


# ------------------------------------------------------------------------ torchvision

def torchvision_state_dict(pretrained: Pretrained) -> dict[str, np.ndarray]:
  """The encoder under torchvision's ResNet names, convolutions as OIHW.

  The names and the v1.5 layout (stride in the 3x3 convolution) are torchvision's,
  so with ``model.width=1.0`` the dict loads with ``strict=True`` into::

      net = torchvision.models.resnet50()   # or resnet18/34/101/152
      net.fc = torch.nn.Identity()          # backbone only: the dict has no fc
      net.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})

  ``resnet10`` is ``torchvision.models.resnet.ResNet(BasicBlock, [1, 1, 1, 1])``.
  Other widths have no torchvision constructor (its ``width_per_group`` widens
  only the bottleneck's inner convolutions). For ``model.stem='cifar'`` replace
  the stem before loading::

      net.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
      net.maxpool = torch.nn.Identity()

  ``num_batches_tracked`` is the training step: the statistics were updated once
  a step. A CMC encoder gives both views' ResNets, under ``l.`` and ``ab.``.

  With head layers (``load_pretrained(..., head_layers=k)``) the dict also holds
  them under ``head.``, numbered as in::

      net.fc = torch.nn.Sequential(torch.nn.Linear(d, h, bias=False),
                                   torch.nn.BatchNorm1d(h, eps=1e-5), torch.nn.ReLU())

  one (Linear, BatchNorm1d, ReLU) triple per layer (Linear with bias and ReLU
  without BN for a head without it); load it with ``fc`` renamed ``head``.
  """
  if isinstance(pretrained.encoder, lab_split.LabSplitEncoder):
    return _each_view(pretrained, torchvision_state_dict)
  if isinstance(pretrained.encoder, models.EncoderWithHeadLayers):
    return _with_head(pretrained)
  params = pretrained.variables['params']
  stats = pretrained.variables['batch_stats']
  step = np.asarray(pretrained.step, np.int64)
  used = set()

  def conv(torch_name, flax_path):
    used.add(('params', *flax_path, 'kernel'))
    kernel = _at(params, flax_path)['kernel']
    return {f'{torch_name}.weight': np.ascontiguousarray(
        np.transpose(kernel, (3, 2, 0, 1)), np.float32)}

  def batch_norm(torch_name, flax_path):
    used.update({('params', *flax_path, 'scale'), ('params', *flax_path, 'bias'),
                 ('batch_stats', *flax_path, 'mean'), ('batch_stats', *flax_path, 'var')})
    p, s = _at(params, flax_path), _at(stats, flax_path)
    values = {'weight': p['scale'], 'bias': p['bias'], 'running_mean': s['mean'],
              'running_var': s['var']}
    out = {f'{torch_name}.{k}': np.asarray(v, np.float32) for k, v in values.items()}
    out[f'{torch_name}.num_batches_tracked'] = step
    return out

  state = {**conv('conv1', ('stem_conv',)), **batch_norm('bn1', ('stem_bn',))}
  encoder = pretrained.encoder
  convs_per_block = 3 if encoder.block is resnet.Bottleneck else 2
  for stage, num_blocks in enumerate(encoder.stage_sizes):
    for i in range(num_blocks):
      block = f'stage{stage + 1}_block{i + 1}'
      prefix = f'layer{stage + 1}.{i}'
      for c in range(convs_per_block):
        state.update(conv(f'{prefix}.conv{c + 1}', (block, f'Conv_{c}')))
        state.update(batch_norm(f'{prefix}.bn{c + 1}', (block, f'BatchNorm_{c}')))
      if f'Conv_{convs_per_block}' in params[block]:   # projection shortcut
        state.update(conv(f'{prefix}.downsample.0', (block, f'Conv_{convs_per_block}')))
        state.update(batch_norm(f'{prefix}.downsample.1',
                                (block, f'BatchNorm_{convs_per_block}')))
  unmapped = {path for path in _leaf_paths(pretrained.variables) if path not in used}
  if unmapped:
    raise ValueError('Encoder variables with no torchvision name (has the ResNet '
                     f'changed?): {sorted(".".join(p) for p in unmapped)[:5]}')
  return state


def _with_head(pretrained: Pretrained) -> dict[str, np.ndarray]:
  """The encoder's torchvision dict and the head layers as ``head.<i>`` modules."""
  module = pretrained.encoder
  state = torchvision_state_dict(pretrained._replace(
      encoder=module.encoder,
      variables={collection: tree['encoder']
                 for collection, tree in pretrained.variables.items()}))
  params = pretrained.variables['params']['head']
  stats = pretrained.variables['batch_stats'].get('head', {})
  per_layer = 3 if module.head.use_bn else 2
  for i in range(module.head.num_layers):
    dense = params[f'Dense_{i}']
    state[f'head.{per_layer * i}.weight'] = np.ascontiguousarray(dense['kernel'].T, np.float32)
    if 'bias' in dense:
      state[f'head.{per_layer * i}.bias'] = np.asarray(dense['bias'], np.float32)
    if module.head.use_bn:
      norm = f'head.{per_layer * i + 1}'
      scale_shift, running = params[f'BatchNorm_{i}'], stats[f'BatchNorm_{i}']
      state.update({f'{norm}.weight': np.asarray(scale_shift['scale'], np.float32),
                    f'{norm}.bias': np.asarray(scale_shift['bias'], np.float32),
                    f'{norm}.running_mean': np.asarray(running['mean'], np.float32),
                    f'{norm}.running_var': np.asarray(running['var'], np.float32),
                    f'{norm}.num_batches_tracked': np.asarray(pretrained.step, np.int64)})
  return state


def _each_view(pretrained: Pretrained, state_dict) -> dict[str, np.ndarray]:
  """``state_dict`` of each view's ResNet of a CMC encoder, under its view's prefix."""
  names = set(pretrained.variables['params'])
  if names != set(lab_split.VIEWS):
    raise ValueError(f'A CMC encoder has the views {", ".join(lab_split.VIEWS)}, this one '
                     f'{", ".join(sorted(names))}.')
  state = {}
  for view in lab_split.VIEWS:
    one = pretrained._replace(
        encoder=pretrained.encoder.view_encoder(),
        variables={collection: tree[view] for collection, tree in pretrained.variables.items()})
    state.update({f'{view}.{name}': value for name, value in state_dict(one).items()})
  return state


def _at(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _leaf_paths(tree, prefix=()):
  if not isinstance(tree, dict):
    return [prefix]
  return [path for key, sub in tree.items() for path in _leaf_paths(sub, (*prefix, key))]


def export_torchvision(workdir: str, out_path: str, step: int | None = None,
                       head_layers: int = 0) -> None:
  """:func:`torchvision_state_dict` as safetensors; metadata: model and input.

  Read it with ``safetensors.torch.load_file(out_path)``; the metadata
  (``safetensors.safe_open(out_path, 'pt').metadata()``) holds ``model`` and
  ``input`` as JSON strings.
  """
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  pretrained = load_pretrained(workdir, step, head_layers)
  paths.resolve(out_path).write_bytes(safetensors.numpy.save(
      torchvision_state_dict(pretrained),
      metadata={'model': json.dumps(pretrained.config.model.to_dict()),
                'input': json.dumps(_torch_input(pretrained.config)),
                'step': str(pretrained.step)}))


# ------------------------------------------------------------------------- detectron2

def detectron2_state_dict(pretrained: Pretrained) -> dict[str, np.ndarray]:
  """The encoder under detectron2's ResNet names (``stem.conv1``, ``res2``..``res5``).

  The torchvision names renamed: ``layerN`` -> ``res{N+1}``, ``bnK`` ->
  ``convK.norm``, ``downsample.0/1`` -> ``shortcut``/``shortcut.norm``, stem
  names prefixed with ``stem.``; ``num_batches_tracked`` is dropped (detectron2's
  frozen BatchNorm has none). The arrays are the same. A CMC encoder gives both
  views' ResNets, under ``l.`` and ``ab.``: each prefix, stripped, is one
  detectron2 backbone, of 1 and 2 input channels; fed raw Lab, its
  ``MODEL.PIXEL_MEAN`` / ``PIXEL_STD`` are (50,) / (50,) and (0, 0) / (110, 110).
  """
  if isinstance(pretrained.encoder, models.EncoderWithHeadLayers):
    raise ValueError('--head_layers: detectron2 takes the backbone\'s feature maps, '
                     'not pooled features, so there is no place for head layers; '
                     'export them in the flax or torchvision format.')
  if pretrained.config.model.stem != 'imagenet':
    raise ValueError(f'model.stem={pretrained.config.model.stem!r}: detectron2 '
                     "builds only the 'imagenet' stem (7x7/2 convolution and "
                     'max-pool), and drops weights whose shape does not match.')
  if isinstance(pretrained.encoder, lab_split.LabSplitEncoder):
    return _each_view(pretrained, detectron2_state_dict)
  return {_detectron2_name(name): value
          for name, value in torchvision_state_dict(pretrained).items()
          if not name.endswith('num_batches_tracked')}


def _detectron2_name(torchvision_name: str) -> str:
  parts = torchvision_name.split('.')
  if parts[0].startswith('layer'):
    parts[0] = f'res{int(parts[0][len("layer"):]) + 1}'
  else:
    parts.insert(0, 'stem')
  name = '.'.join(parts)
  name = name.replace('downsample.0.', 'shortcut.').replace('downsample.1.',
                                                            'shortcut.norm.')
  for k in (1, 2, 3):
    name = name.replace(f'.bn{k}.', f'.conv{k}.norm.')
  return name


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


def export_detectron2(workdir: str, out_path: str, step: int | None = None,
                      head_layers: int = 0) -> None:
  """A .pkl that detectron2's ``DetectionCheckpointer`` loads by exact names.

  Config to match it: ``MODEL.WEIGHTS=<out_path>``, ``MODEL.RESNETS.DEPTH`` the
  depth (18, 34, 50, 101 or 152; detectron2 has no 10), ``MODEL.RESNETS.STRIDE_IN_1X1
  False`` (v1.5 layout), ``INPUT.FORMAT 'RGB'``, ``MODEL.PIXEL_MEAN`` and
  ``MODEL.PIXEL_STD`` = 255 x the run's ``aug.mean`` / ``aug.std`` (0 and 255 when
  the run did not normalise). ResNet-18/34 need ``RES2_OUT_CHANNELS 64`` and
  width 1 (detectron2 fixes their channels). Bottleneck nets of ``model.width``
  w != 1 need ``STEM_OUT_CHANNELS`` = ``WIDTH_PER_GROUP`` = int(64 w) and
  ``RES2_OUT_CHANNELS`` = 4 int(64 w).
  """
  pretrained = load_pretrained(workdir, step, head_layers)
  checkpoint = {'model': detectron2_state_dict(pretrained),
                '__author__': f'contrastive.export of {paths.resolve(workdir)} '
                              f'step {pretrained.step}',
                'matching_heuristics': False}
  buffer = io.BytesIO()
  _PortablePickler(buffer, protocol=4).dump(checkpoint)
  paths.resolve(out_path).write_bytes(buffer.getvalue())


# ----------------------------------------------------------------------- command line

EXPORTERS = {'flax': export_flax, 'torchvision': export_torchvision,
             'detectron2': export_detectron2}


def _run(argv):
  values = flags.FLAGS
  command_line.run(argv, lambda: EXPORTERS[values.format](
      values.workdir, values.out, values.step, values.head_layers))
  print(f'Wrote {values.out} ({values.format}).')


def main():
  """``python -m contrastive.export``.

  The flags are defined here rather than at import, so that programs importing
  this module for :func:`load_pretrained` keep their own ``--workdir``.
  """
  flags.DEFINE_string('workdir', None, 'Workdir of a training run.')
  flags.DEFINE_enum('format', None, FORMATS, 'What to write.')
  flags.DEFINE_string('out', None, 'Output file.')
  flags.DEFINE_integer('step', None, 'Checkpoint step; default: the latest.')
  flags.DEFINE_integer('head_layers', 0, 'Hidden layers of the projection head to '
                       'export on top of the encoder (SimCLR v2: 1); not detectron2.')
  flags.mark_flags_as_required(['workdir', 'format', 'out'])
  app.run(_run)


if __name__ == '__main__':
  main()

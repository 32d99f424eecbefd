"""The pretrained backbone of a training workdir: read it, encode images with it.

:func:`load_pretrained` gives the run's config, its backbone (the network its
method names, :attr:`contrastive.methods.Method.backbone`) and the backbone's
variables; :func:`encode` gives features of images as the trainer evaluates.
Only the backbone's arrays are read from the checkpoint, as host numpy arrays,
so the method state (queues, EMA targets), the optimizer state and the sharding
of the run (any number of devices) do not matter. ``head_layers=k`` adds the
first k hidden layers of the run's projection head (SimCLR v2 fine-tunes from
the first). Export, downstream evaluation and plots read runs through here.

Orbax, the config schema and the methods are imported inside the functions that
read a workdir, so that importing this module stays cheap.
"""

import functools
import logging
from typing import Any, NamedTuple

import jax
import numpy as np

from contrastive import models
from contrastive import paths
from contrastive.models import heads


class Pretrained(NamedTuple):
  """The backbone of a run, and the config that trained it."""
  config: Any           # ml_collections.ConfigDict with every field of base_config()
  encoder: Any          # the method's backbone (flax module), or models.EncoderWithHeadLayers
  variables: dict       # the backbone's Flax variables ({'params', 'batch_stats'}), numpy
  step: int
  method: Any           # the run's contrastive.methods.Method, whose backbone it is


class _Saved(NamedTuple):
  """A leaf of a checkpoint's metadata tree, with where it lies in the checkpoint."""
  path: tuple
  shape: tuple
  dtype: Any


# ----------------------------------------------------------------------------- config

def read_config(workdir: str):
  """The pretraining config of ``workdir`` on today's schema (fields added since
  the run exist with their defaults)."""
  from contrastive import config as config_lib  # pylint: disable=g-import-not-at-top
  config_path = paths.resolve(workdir) / 'config.json'
  if not config_path.is_file():
    raise FileNotFoundError(f'{config_path} does not exist: {workdir} is not the '
                            'workdir of a training run.')
  from contrastive import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  try:
    saved = workdir_lib.read_json_object(config_path, 'the config of a training run')
  except ValueError as unreadable:
    raise ValueError(f'{unreadable} Running its training command again writes it anew '
                     '(the checkpoints are not affected).') from None
  if 'method' not in saved:
    raise ValueError(f'{config_path} is not the config of a pretraining run (it has no '
                     '"method"): point at the workdir of contrastive.main.')
  config = config_lib.base_config()
  config.update(saved)
  return config


# ----------------------------------------------------------------------------- checkpoint

def _open(workdir: str):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  directory = paths.resolve(workdir) / 'checkpoints'
  if not directory.is_dir():
    raise FileNotFoundError(f'{directory} does not exist: the run in {workdir} saved '
                            'no checkpoint yet.')
  from contrastive import checkpoint  # pylint: disable=g-import-not-at-top
  # Both items named, so that Orbax knows the run record it is not asked for.
  # Read-only, which Orbax announces in a warning on every open: it is what
  # was asked for here, so the notice is dropped.
  absl_logger = logging.getLogger('absl')
  absl_logger.addFilter(_drop_read_only_notice)
  try:
    return ocp.CheckpointManager(
        directory, item_handlers={checkpoint.STATE: ocp.PyTreeCheckpointHandler(),
                                  checkpoint.RUN: ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(read_only=True, create=False,
                                             save_interval_steps=0))
  finally:
    absl_logger.removeFilter(_drop_read_only_notice)


def _drop_read_only_notice(record: logging.LogRecord) -> bool:
  return not record.getMessage().startswith('Given directory is read only')


def _pick_step(manager, step: int | None) -> int:
  steps = manager.all_steps()
  if not steps:
    raise FileNotFoundError(f'{manager.directory} holds no complete checkpoint.')
  if step is None:
    return max(steps)
  if step not in steps:
    raise FileNotFoundError(f'{manager.directory} has no checkpoint of step {step}; it '
                            f'has steps {", ".join(map(str, sorted(steps)))}.')
  return step


def _tagged(tree, path=()):
  """A metadata tree with each array replaced by its :class:`_Saved` record."""
  if isinstance(tree, dict):
    return {key: _tagged(value, (*path, key)) for key, value in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [_tagged(value, (*path, str(i))) for i, value in enumerate(tree)]
  if hasattr(tree, 'shape'):
    return _Saved(path, tuple(tree.shape), tree.dtype)
  return tree


def _trained_fields(manager, step: int) -> tuple[dict, dict]:
  """``(params, model_state)`` of the checkpoint at ``step``, as :class:`_Saved`
  leaves. A checkpoint written before the model state was generic holds its
  BatchNorm statistics at the top (``batch_stats``): they are its model state."""
  from contrastive import checkpoint  # pylint: disable=g-import-not-at-top
  saved = checkpoint.upgraded(_tagged(dict(manager.item_metadata(step)[checkpoint.STATE].tree)))
  return saved['params'], saved['model_state']


def _restore(manager, step: int, selection):
  """``selection`` (a tree of :class:`_Saved`) with each leaf read from the
  checkpoint, as numpy: one partial restore of just those arrays."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  is_saved = lambda x: isinstance(x, _Saved)  # noqa: E731
  item = {}
  for leaf in jax.tree.leaves(selection, is_leaf=is_saved):
    node = item
    for key in leaf.path[:-1]:
      node = node.setdefault(key, {})
    node[leaf.path[-1]] = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)
  if not item:
    return selection
  # restore_type=np.ndarray ignores the shardings recorded at save time, so any
  # device count can read them.
  from contrastive import checkpoint  # pylint: disable=g-import-not-at-top
  restored = manager.restore(step, args=ocp.args.Composite(**{
      checkpoint.STATE: ocp.args.PyTreeRestore(
          item=item, partial_restore=True,
          restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                    item))}))[checkpoint.STATE]

  def value(leaf):
    node = restored
    for key in leaf.path:
      node = node[key]
    return node
  return jax.tree.map(value, selection, is_leaf=is_saved)


# ----------------------------------------------------------------------------- load

def load_pretrained(workdir: str, step: int | None = None, head_layers: int = 0,
                    method=None) -> Pretrained:
  """The backbone of ``workdir``'s checkpoint at ``step`` (default: the latest),
  with the first ``head_layers`` hidden layers of its projection head on top
  (:func:`with_head_layers`). The backbone has no BatchNorm axis name: it runs,
  and fine-tunes, outside any mesh. ``method``: the run's
  :class:`~contrastive.methods.Method`, for one from outside the library
  (default: ``METHODS[config.method]``)."""
  from contrastive import methods  # pylint: disable=g-import-not-at-top
  config = read_config(workdir)
  method = method or methods.get_method(config.method)
  manager = _open(workdir)
  try:
    step = _pick_step(manager, step)
    variables = _restore(manager, step, method.backbone_variables(
        *_trained_fields(manager, step)))
  finally:
    manager.close()
  pretrained = Pretrained(config=config, encoder=method.backbone(config),
                          variables=variables, step=int(step), method=method)
  return with_head_layers(pretrained, workdir, head_layers) if head_layers else pretrained


def check_head_layers(head_layers: int, head) -> None:
  """``config.head_layers`` against the pretraining run's head config, before any
  of its arrays is read."""
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
  """The Flax variables (``params``, and ``batch_stats`` with BN) of the first
  ``num_layers`` hidden layers of the projection head in ``workdir``'s checkpoint
  of ``step``, as host numpy arrays, read as the backbone is."""
  names = {f'{kind}_{i}' for kind in ('Dense', 'BatchNorm') for i in range(num_layers)}
  manager = _open(workdir)
  try:
    params, model_state = _trained_fields(manager, step)
    missing = sorted(f'Dense_{i}' for i in range(num_layers)
                     if f'Dense_{i}' not in params.get('head', {}))
    if missing:
      head = params.get('head', {})
      parts = sorted(name for name, part in head.items()
                     if isinstance(part, dict) and 'Dense_0' in part)
      why = (f'it holds one projection head per view ({", ".join(parts)}), so only '
             "config.head_layers=0 (the backbone's features) fits it" if parts and
             len(parts) == len(head) else
             'its method has no single projection head to keep layers of')
      raise ValueError(f'config.head_layers={num_layers}; the checkpoint of step {step} '
                       f'in {manager.directory} has no {", ".join(missing)} under '
                       f'params["head"]: {why}.')
    selection = {}
    for collection, tree in {'params': params, **model_state}.items():
      layers = {name: layer for name, layer in tree.get('head', {}).items() if name in names}
      if layers:
        selection[collection] = layers
    return _restore(manager, step, selection)
  finally:
    manager.close()


def with_head_layers(pretrained: Pretrained, workdir: str, head_layers: int) -> Pretrained:
  """``pretrained`` with the first ``head_layers`` hidden layers of its run's
  projection head on top of the encoder (SimCLR v2 fine-tunes from the first),
  read from the same checkpoint; variables nest ``encoder`` and ``head``."""
  check_head_layers(head_layers, pretrained.config.head)
  head_variables = read_head_layers(workdir, pretrained.step, head_layers)
  head = models.build_model(pretrained.config.model, pretrained.config.head).head
  layers = heads.hidden_layers(head, head_layers).clone(bn_axis_name=None)
  variables = {collection: {'encoder': tree,
                            **({'head': head_variables[collection]}
                               if collection in head_variables else {})}
               for collection, tree in pretrained.variables.items()}
  return pretrained._replace(encoder=models.EncoderWithHeadLayers(pretrained.encoder, layers),
                             variables=variables)


# ----------------------------------------------------------------------------- encode

@functools.partial(jax.jit, static_argnums=0)
def _features(encoder, variables, pixels):
  return encoder.apply(variables, pixels, train=False)


def encode(pretrained: Pretrained, images, batch_size: int = 256) -> np.ndarray:
  """Backbone features [N, num_features] of NHWC images, as the trainer evaluates.

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
  features = []
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    padded = np.pad(chunk, [(0, batch_size - len(chunk))] + [(0, 0)] * 3)
    pixels = augment.preprocess_eval(padded, pretrained.config.aug)
    features.append(np.asarray(
        _features(pretrained.encoder, variables, pixels))[:len(chunk)])
  if not features:
    return np.zeros((0, pretrained.encoder.num_features), np.float32)
  return np.concatenate(features)

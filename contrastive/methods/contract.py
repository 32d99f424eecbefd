"""What a method is: plain functions with defaults, and the types they exchange.

A method is one :class:`Method` value. Only ``name`` and ``loss`` are required;
every other part has a default for a method that does not need it (two views
with ``config.aug``, the encoder + projection head network, no state of its own,
the encoder's features for evaluation). The trainer calls these functions and
nothing else, so a new method is one file, with no trainer change.

Each function gets a :class:`Context`: the method's network, the config, the
:class:`RunInfo` and the mesh axis name (None outside the per-replica step).

What a network keeps besides its parameters is its ``model_state``: Flax's other
variable collections (``{'batch_stats': ...}`` with BatchNorm, a ViT's fixed
patch projection under ``'frozen'``, ``{}`` for a LayerNorm ResNet). Methods
thread it through :func:`forward` and never name a collection themselves.

The backbone, what evaluation, downstream tasks, exports and plots use, is the
method's to say: :attr:`Method.backbone` builds it and
:attr:`Method.backbone_variables` reads its variables out of the trained state.
A method's own config section (``config.<name>``) has its defaults in
:attr:`Method.default_config` and its checks in :attr:`Method.check_config`.
"""

import dataclasses
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import flax.struct
import jax
import ml_collections
from jax.sharding import PartitionSpec as P

from contrastive import models


class RunInfo(NamedTuple):
  """Facts about the run that a method's state depends on."""
  num_examples: int         # images in the training split (memory-bank rows)
  num_devices: int          # devices on the data axis (queue and bank shards)
  total_steps: int          # for schedules such as a cosine EMA momentum


class Context(NamedTuple):
  """The fixed facts a method's functions read: built once per run."""
  model: nn.Module                    # what ``Method.build_model`` returned
  config: ml_collections.ConfigDict
  run: RunInfo
  axis_name: str | None               # the mesh axis in the per-replica step


class PatchGrid(NamedTuple):
  """A view cut into a grid of overlapping patches, each augmented on its own.

  ``size`` x ``size`` patches every ``stride`` pixels of the view, each given
  ``aug`` (its crop is within the patch); ``field`` names ``aug`` in the config.
  """
  size: int
  stride: int
  aug: ml_collections.ConfigDict
  field: str


class View(NamedTuple):
  """One augmented view of every image: its augmentation section and size.

  ``field`` is where ``aug`` sits in the config, so that a bad value is reported
  by name (``config.aug.flip_prob``). With a ``grid``, the view reaches the loss
  as patches, ``[b, G * G, p, p, 3]`` (:func:`contrastive.data.augment.
  augment_patch_grid`): ``aug`` crops and flips the whole image, the grid's own
  section each patch, and ``aug``'s normalisation comes last.
  """
  aug: ml_collections.ConfigDict
  size: int
  field: str = 'aug'
  grid: PatchGrid | None = None


class Batch(NamedTuple):
  """What a method's loss sees of one step's input, on one replica."""
  views: tuple[jax.Array, ...]   # float32 [b, size, size, 3] (a grid: [b, G * G, p, p, 3])
  index: jax.Array               # int32 [b]: each image's position in the training split


class LossOutput(NamedTuple):
  """What a method's per-replica loss returns.

  ``loss`` is the global-batch loss, the same value on every replica (so that its
  gradient under ``shard_map`` is the global gradient). ``features`` are the
  encoder features of the first view, which the online probe trains on.
  ``for_update`` carries what ``update_state`` needs from the forward pass (new
  keys, embeddings, the target's model state); ``metrics`` are extra scalars.
  """
  loss: jax.Array
  model_state: Any
  features: jax.Array
  for_update: Any = ()
  metrics: dict = {}


class TrainState(flax.struct.PyTreeNode):
  """The whole state of a run: what a checkpoint holds."""
  step: jax.Array
  params: Any           # every trained network of the method
  model_state: Any      # the networks' other variable collections (BatchNorm statistics)
  opt_state: Any
  method_state: Any     # EMA targets, queues, banks: ``Method.init_state``
  probe: Any            # online linear probe: params and optimizer state ({} when off)


# ------------------------------------------------------------------ networks

PARAMS = 'params'
STATISTICS = 'batch_stats'     # per-batch statistics, the collection replicas average
_DROPOUT = 0x64726f70           # folded into a step's key for stochastic depth


def model_state_of(variables) -> dict:
  """Everything of a network's ``variables`` besides its parameters."""
  return {name: value for name, value in variables.items() if name != PARAMS}


def forward(model: nn.Module, variables, images, key=None, method=None):
  """``model`` in training mode: ``(outputs, model_state)``.

  ``variables`` is ``{'params': ..., **model_state}``; every collection but the
  parameters may change (BatchNorm's statistics do; a fixed one comes back as it
  was), so a method never names a collection. ``key``: randomness of the
  network itself (stochastic depth), from :func:`replica_key`.
  """
  rngs = None if key is None else {'dropout': key}
  outputs, updates = model.apply(variables, images, train=True,
                                 mutable=list(model_state_of(variables)), rngs=rngs,
                                 method=method)
  return outputs, {**model_state_of(variables), **updates}


def replica_key(key, axis_name):
  """The network's own randomness on this replica, apart from the method's draws
  with ``key``. Per replica: stochastic depth then depends on the device count,
  as any per-device draw does. None (no randomness) stays None."""
  if key is None:
    return None
  key = jax.random.fold_in(key, _DROPOUT)
  return key if axis_name is None else jax.random.fold_in(key, jax.lax.axis_index(axis_name))


def mean_statistics(model_state, axis_name):
  """``model_state`` with per-device statistics (BatchNorm without a mesh axis)
  averaged over the replicas, so that every replica keeps the same state."""
  if axis_name is None or STATISTICS not in model_state:
    return model_state
  return {**model_state, STATISTICS: jax.lax.pmean(model_state[STATISTICS], axis_name)}


# ------------------------------------------------------------------ the defaults


def encoder_with_head(config: ml_collections.ConfigDict) -> nn.Module:
  """The encoder of ``config.model`` with the projection head of ``config.head``."""
  return models.build_model(config.model, config.head)


def encoder_backbone(config: ml_collections.ConfigDict, axis_name: str | None = None):
  """The encoder of ``config.model``; its BatchNorm synchronised over ``axis_name``."""
  return models.with_bn_axis(models.build_encoder(config.model), axis_name)


def encoder_variables(params, model_state) -> dict:
  """The variables of the network under ``'encoder'`` in every collection."""
  return {PARAMS: params['encoder'],
          **{name: tree['encoder'] for name, tree in model_state.items() if 'encoder' in tree}}


def two_views(config: ml_collections.ConfigDict) -> tuple[View, ...]:
  """Two views of each image, both with ``config.aug``, at ``data.image_size``."""
  view = View(config.aug, config.data.image_size, 'aug')
  return (view, view)


def no_section() -> None:
  return None


def no_problems(config: ml_collections.ConfigDict) -> list[str]:
  del config
  return []


def no_run_problems(config: ml_collections.ConfigDict, run: RunInfo) -> list[str]:
  del config, run
  return []


def network_params(ctx: Context, variables, key):
  del ctx, key
  return variables[PARAMS]


def all_replicated(config: ml_collections.ConfigDict) -> dict:
  del config
  return {}


def no_state(ctx: Context, variables, key):
  del ctx, variables, key
  return {}


def replicated(config: ml_collections.ConfigDict):
  del config
  return P()


def keep_state(ctx: Context, method_state, params, for_update, step):
  del ctx, params, for_update, step
  return method_state


def not_needed(config: ml_collections.ConfigDict):
  """No epoch work, no initialisation from the data."""
  del config
  return None


@dataclasses.dataclass(frozen=True)
class Method:
  """A contrastive method, as the trainer sees it.

  Attributes:
    name: what ``config.method`` says to choose it; its config section is
      ``config.<name>``.
    loss: ``(ctx, params, model_state, method_state, batch: Batch, key) ->
      LossOutput``, per replica, written with collectives over ``ctx.axis_name``;
      ``key`` is the step's randomness, the same on every replica.
    default_config: ``() ->`` the defaults of the method's section
      (``ml_collections.ConfigDict``), or None for a method without one.
      :func:`contrastive.config.base_config` holds the library's methods'
      sections; a config for another method adds its own
      (:func:`contrastive.config.add_method_section`).
    build_model: ``config -> nn.Module``, every network the method trains
      (encoder, head, predictor, classifier), called as ``model(images,
      train=...)``.
    backbone: ``(config, axis_name) -> nn.Module``, the network that evaluation,
      downstream tasks and exports use, called as ``backbone(images, train=...)``
      and returning features; its BatchNorm, if any, synchronised over
      ``axis_name`` (None: per device or outside a mesh).
    backbone_variables: ``(params, model_state) -> variables`` of the backbone,
      read from the trained state: a selection of its subtrees, so that it also
      picks them out of a checkpoint's metadata without reading the rest.
    views: ``config -> tuple[View, ...]``, the views the trainer builds, each
      image's randomness keyed by its position in the global batch.
    check_config: ``config -> list[str]``, the problems with the method's own
      config section, each naming its field; run before any data is read.
    check_run: ``(config, run: RunInfo) -> list[str]``, the problems only the
      split's size reveals (a queue of negatives longer than the split, whose
      positives would come back as negatives); run once the split is known.
    init_params: ``(ctx, variables, key) -> params``, the trained parameters:
      the network's ``variables['params']``, plus any the network does not hold
      (a classifier with one row per training image).
    param_specs: ``config -> {name: PartitionSpec}`` for the top-level entries of
      the parameters that are split across devices (``P('data')``: by rows, each
      device holding, updating and checkpointing its own rows, its optimizer
      state split the same way); every other entry is replicated.
    init_state: ``(ctx, variables, key) -> method_state``, the state beyond the
      trained parameters, from the freshly initialised ``variables``.
    state_specs: ``config -> PartitionSpec pytree prefix`` of that state: ``P()``
      replicated, ``P('data')`` split by rows across the devices.
    start_epoch: ``config ->`` None, or a ``(ctx, method_state, params) ->
      method_state`` run per replica, as a program of its own, before the first
      step of every epoch (a neighbour search over a sharded table).
    update_state: ``(ctx, method_state, params, for_update, step) ->
      method_state`` after the optimizer step (EMA target, enqueue, bank write).
    init_from_data: ``config ->`` None, or a ``(ctx, params, model_state,
      method_state, images, index, mask) -> (params, method_state)`` that
      initialises from the data: called per replica on every batch of one pass
      over the training split in its order (evaluation preprocessing, ``index``
      each image's position in the split, ``mask`` False on padding) before the
      first step of a fresh run.
  """
  name: str
  loss: Callable[..., LossOutput]
  default_config: Callable[[], ml_collections.ConfigDict | None] = no_section
  build_model: Callable[[ml_collections.ConfigDict], nn.Module] = encoder_with_head
  backbone: Callable[..., nn.Module] = encoder_backbone
  backbone_variables: Callable[..., dict] = encoder_variables
  views: Callable[[ml_collections.ConfigDict], tuple[View, ...]] = two_views
  check_config: Callable[[ml_collections.ConfigDict], list[str]] = no_problems
  check_run: Callable[[ml_collections.ConfigDict, RunInfo], list[str]] = no_run_problems
  init_params: Callable[..., Any] = network_params
  param_specs: Callable[[ml_collections.ConfigDict], dict] = all_replicated
  init_state: Callable[..., Any] = no_state
  state_specs: Callable[[ml_collections.ConfigDict], Any] = replicated
  start_epoch: Callable[[ml_collections.ConfigDict], Callable | None] = not_needed
  update_state: Callable[..., Any] = keep_state
  init_from_data: Callable[[ml_collections.ConfigDict], Callable | None] = not_needed

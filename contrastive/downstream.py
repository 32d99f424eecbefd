"""Offline evaluation of a pretrained encoder: linear classification or fine-tuning.

    python -m contrastive.downstream --config=configs/linear_eval_moco.py \
        --config.pretrained=/tmp/quickstart --workdir=/tmp/quickstart_linear

``mode='linear'`` trains a linear classifier on the frozen backbone, BatchNorm in
inference mode, and checks at the end that the backbone is bit-identical to the
pretrained one. ``mode='finetune'`` trains backbone and classifier together, with
cross-replica BatchNorm (the semi-supervised setting, usually on a
``label_fraction`` of the labels). Both report top-1 and top-5 accuracy on the
eval split and write them to ``workdir/downstream.json``. Running the same command
again resumes from the workdir's latest checkpoint.

The backbone is the encoder, or with ``head_layers`` the encoder and the first
hidden layers of the run's projection head (SimCLR v2 fine-tunes from the first),
read from the same checkpoint and frozen or trained with the encoder.

The data config defaults to the pretraining run's (every ``config.data`` field
left unset is inherited). In-memory datasets are held whole by every process, and
crops and flips run on the device; streamed datasets (``data.in_memory=False``)
go through the tf.data pipeline and need ``label_fraction=1``: for ImageNet's
standard 1% / 10% subsets use the TFDS builder ``imagenet2012_subset/1pct``
(or ``10pct``) as ``data.name``.
"""

import os
from typing import NamedTuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from contrastive import command_line
from contrastive import config as config_lib
from contrastive import config_checks
from contrastive import loop
from contrastive import models
from contrastive import parallel
from contrastive import paths
from contrastive import reader
from contrastive import workdir as workdir_lib
from contrastive.data import augment
from contrastive.data import evaluation as eval_data
from contrastive.data import in_memory
from contrastive.data import sources
from contrastive.evaluate import features as features_lib
from contrastive.methods import View
from contrastive.methods.contract import forward, model_state_of

AXIS = parallel.AXIS
TOP_K = (1, 5)
say = loop.say


class DownstreamState(flax.struct.PyTreeNode):
  """What a downstream checkpoint holds. In linear mode ``params`` is only the
  classifier and ``model_state`` the frozen backbone's (its BatchNorm statistics);
  the frozen backbone parameters are reloaded from the pretraining workdir.
  Fine-tuning, ``params['encoder']`` holds the backbone's parameters. With
  ``head_layers`` the backbone's variables nest ``encoder`` and ``head`` as the
  pretraining checkpoint's do (:class:`Backbone`)."""
  step: jax.Array
  params: dict
  model_state: dict
  opt_state: optax.OptState


# ----------------------------------------------------------------------------- backbone

class Backbone(NamedTuple):
  """What the classifier sits on: the pretraining method's backbone. With
  ``head_layers=0`` the backbone and its own variables, so such runs keep the
  checkpoint layout they always had."""
  module: nn.Module         # (images, train) -> features
  cross_replica: nn.Module  # the same, its BatchNorm over the data axis (fine-tuning)
  variables: dict           # Flax variables ({'params', 'batch_stats'}), host numpy
  num_features: int


def load_backbone(config, pretrained: reader.Pretrained) -> Backbone:
  """The backbone, or with ``config.head_layers`` the backbone and that many of
  the pretrained head's hidden layers, from the same checkpoint."""
  if config.head_layers:
    pretrained = reader.with_head_layers(pretrained, config.pretrained, config.head_layers)
  module = pretrained.encoder
  synchronised = pretrained.method.backbone(pretrained.config, AXIS)
  if isinstance(module, models.EncoderWithHeadLayers):
    synchronised = module.clone(encoder=synchronised,
                                head=module.head.clone(bn_axis_name=AXIS))
  return Backbone(module, synchronised, pretrained.variables, module.num_features)


# ----------------------------------------------------------------------------- data

def label_subset(labels: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
  """Sorted indices of a class-balanced subset with about ``fraction`` of the images.

  Every class contributes the same number of images, ``fraction * N / C`` rounded
  and at least one (all of its images if it has fewer), drawn with ``seed`` only,
  so runs that differ in anything else train on the same subset.
  """
  if not 0 < fraction <= 1:
    raise ValueError(f'config.label_fraction={fraction} must be in (0, 1].')
  labels = np.asarray(labels)
  if fraction == 1:
    return np.arange(len(labels))
  classes = np.unique(labels)
  per_class = max(1, round(fraction * len(labels) / len(classes)))
  rng = np.random.default_rng(seed)
  chosen = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in classes]
  return np.sort(np.concatenate(chosen))


def _resolve_data(overrides, pretraining) -> ml_collections.ConfigDict:
  """The pretraining run's data fields with this run's set ones on top; a field
  the pretraining run's config predates takes today's default."""
  data = ml_collections.ConfigDict({**config_lib.base_config().data.to_dict(),
                                    **pretraining.to_dict()})
  for name, value in overrides.items():
    if value is not None:
      data[name] = value
  return data


def _train_aug(config, pretraining_aug) -> ml_collections.ConfigDict:
  """Crop and flip from ``config.aug``; the pretraining run's normalisation; no
  colour, blur or solarisation (a probability of 0 leaves the op out)."""
  aug = ml_collections.ConfigDict(pretraining_aug.to_dict())
  aug.crop_area = tuple(config.aug.crop_area)
  aug.crop_aspect = tuple(config.aug.crop_aspect)
  aug.flip_prob = config.aug.flip_prob
  for name in ('color_jitter_prob', 'grayscale_prob', 'blur_prob', 'solarize_prob'):
    aug[name] = 0.0
  return aug


# ----------------------------------------------------------------------------- steps

def make_classifier(num_classes: int) -> nn.Dense:
  return nn.Dense(num_classes, kernel_init=nn.initializers.normal(0.01),
                  bias_init=nn.initializers.zeros)


def init_state(mode: str, classifier, tx, backbone: Backbone, seed: int) -> DownstreamState:
  """A new classifier (and, fine-tuning, the pretrained backbone) and its optimizer
  state, a pure function of ``seed``: one compiled function rather than many small
  eager ops, drawn with an RBG key, which compiles several times faster than
  threefry on CPU."""

  @jax.jit
  def initialize(key, variables):
    features = jnp.zeros((1, backbone.num_features))
    params = {'classifier': classifier.init(key, features)['params']}
    if mode == 'finetune':
      params['encoder'] = variables['params']
    return DownstreamState(step=jnp.zeros((), jnp.int32), params=params,
                           model_state=model_state_of(variables), opt_state=tx.init(params))

  return initialize(jax.random.key(seed, impl='rbg'), backbone.variables)


def make_train_step(mode: str, backbone: nn.Module, classifier, tx, schedule, aug,
                    image_size: int, crop: bool, seed: int):
  """The per-replica train step ``(state, frozen, batch) -> (state, scalars)``.

  ``backbone``: the frozen network in linear mode, the cross-replica one
  fine-tuning; ``frozen`` is the backbone's params in linear mode (an empty dict
  otherwise). Each image's crop and flip come from its position in the global
  batch, so the result does not depend on how the batch is split across devices.
  """
  finetune = mode == 'finetune'

  def train_step(state: DownstreamState, frozen, batch):
    step_key = jax.random.fold_in(jax.random.key(seed), state.step)
    keys = augment.global_image_keys(step_key, batch['label'].shape[0], AXIS)
    images = augment.augment_images(keys, batch['image'], aug, image_size, crop=crop)
    if not finetune:
      features = backbone.apply({'params': frozen, **state.model_state}, images, train=False)

    def loss_fn(params):
      model_state = state.model_state
      if finetune:
        x, model_state = forward(backbone, {'params': params['encoder'], **model_state},
                                 images)
      else:
        x = features
      logits = classifier.apply({'params': params['classifier']}, x)
      # pmean makes the loss the global-batch loss on every replica; under shard_map
      # the gradient with respect to replicated params is then the global gradient
      # (the transpose of the replicated -> per-replica broadcast sums the replicas).
      loss = jax.lax.pmean(optax.softmax_cross_entropy_with_integer_labels(
          logits, batch['label']).mean(), AXIS)
      return loss, (model_state, logits)

    (loss, (model_state, logits)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(step=state.step + 1,
                              params=optax.apply_updates(state.params, updates),
                              model_state=model_state, opt_state=opt_state)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch['label'])
    return new_state, {'loss': loss, 'learning_rate': schedule(state.step),
                       'train_accuracy': jax.lax.pmean(accuracy, AXIS)}

  return train_step


def make_eval_step(mode: str, backbone: nn.Module, classifier, aug):
  """The per-replica ``((state, frozen), images) -> logits``, BN in inference mode."""

  def eval_step(state_and_frozen, images):
    state, frozen = state_and_frozen
    params = state.params['encoder'] if mode == 'finetune' else frozen
    features = backbone.apply({'params': params, **state.model_state},
                              augment.preprocess_eval(images, aug), train=False)
    return classifier.apply({'params': state.params['classifier']}, features)

  return eval_step


def top_k_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
  """Fraction of rows whose label is among the k largest logits (k capped at C)."""
  k = min(k, logits.shape[-1])
  top = np.argpartition(-logits, k - 1, axis=-1)[:, :k]
  return float(np.mean(np.any(top == labels[:, None], axis=-1)))


# ----------------------------------------------------------------------------- main

def _pretrained_step(config, manager, workdir: str) -> int | None:
  """The configured step, else the one a resumed run started from (recorded in its
  config.json), else None (the latest): a restarted run keeps its backbone even if
  the pretraining run has saved newer checkpoints since."""
  if config.pretrained_step is not None:
    return config.pretrained_step
  path = paths.resolve(workdir) / 'config.json'
  if manager.latest_step() is not None and path.exists():
    try:
      return workdir_lib.read_json_object(path, 'the record of a downstream run').get(
          'pretrained_step')
    except ValueError as unreadable:
      raise ValueError(f'{unreadable} It recorded the pretraining step this run started '
                       'from: give it as --config.pretrained_step to resume.') from None
  return None


def _load_pretrained(config, step, method) -> reader.Pretrained:
  try:
    return reader.load_pretrained(config.pretrained, step, method=method)
  except FileNotFoundError as err:
    raise FileNotFoundError(f'config.pretrained={config.pretrained!r}: {err}') from err


def _labelled_data(config, data, layout: loop.Layout):
  """``(train_data, num_examples, num_classes)`` of the (subset of the) labels."""
  if data.in_memory:
    train_split = sources.load_arrays(data, 'train')
    if train_split.labels is None:
      raise ValueError('Downstream training needs labels, and the training split has none.')
    subset = label_subset(train_split.labels, config.label_fraction, config.subset_seed)
    return (in_memory.LabelledTrainData(train_split.images[subset],
                                        train_split.labels[subset], layout.mesh,
                                        config.global_batch_size, config.seed),
            len(subset), train_split.num_classes)
  if config.label_fraction != 1:
    raise ValueError(
        f'config.label_fraction={config.label_fraction} needs data.in_memory=True; '
        'for ImageNet use the standard subsets instead: '
        '--config.data.name=imagenet2012_subset/1pct (or 10pct) '
        '--config.label_fraction=1.0.')
  info = sources.split_info(data, 'train')
  if info.num_classes is None:
    raise ValueError('Downstream training needs labels, and the training split has none.')
  return None, info.num_examples, info.num_classes


def _streamed_batches(config, data, aug, local_batch: int, start_position: int):
  """The host pipeline crops and flips; a restart continues its stream where the
  checkpoint says, as pretraining does."""
  from contrastive.data import pipeline  # pylint: disable=g-import-not-at-top
  stream = pipeline.train_iterator(data, [View(aug, data.image_size)], local_batch,
                                   seed=config.seed, shard_index=jax.process_index(),
                                   shard_count=jax.process_count(),
                                   start_position=start_position)
  return ({'image': batch['views'][0], 'label': batch['label'],
           'position': batch['position']} for batch in stream)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       method=None) -> dict:
  """Trains the classifier (and, fine-tuning, the backbone); returns the figures
  written to ``workdir/downstream.json``. ``method``: the pretraining run's
  :class:`~contrastive.methods.Method`, for one from outside the library."""
  if not config.pretrained:
    raise ValueError('config.pretrained is empty: set it to the workdir of a pretraining '
                     'run, e.g. --config.pretrained=/tmp/quickstart.')
  if not paths.resolve(config.pretrained).is_dir():
    raise FileNotFoundError(f'config.pretrained={config.pretrained!r} is not a directory: '
                            'it must be the workdir of a pretraining run.')
  _check_workdir(workdir, config)
  config_checks.validate_downstream(config)
  with loop.Preemption() as preemption, \
       workdir_lib.Workdir(workdir, config.keep_checkpoints) as run_dir:
    return _run(config, run_dir, preemption, method)


def _check_workdir(workdir: str, config) -> None:
  """The downstream run needs a workdir of its own: one that holds a pretraining
  run would be resumed as a downstream run, and fail on every config field."""
  place = _place(workdir)
  suggestion = f'e.g. --workdir={place}_{config.mode}'
  if place == _place(config.pretrained):
    raise ValueError(f'--workdir={workdir} is config.pretrained={config.pretrained!r}: the '
                     f'downstream workdir must differ from config.pretrained ({suggestion}).')
  saved = paths.resolve(workdir) / 'config.json'
  try:
    record = workdir_lib.read_json_object(saved, 'a config record') if saved.is_file() else {}
  except ValueError:
    record = {}      # cut short: resuming names it where it matters
  if 'method' in record:
    raise ValueError(f'--workdir={workdir} holds a pretraining run ({saved}): give the '
                     f'downstream run a workdir of its own ({suggestion}).')


def _place(path: str) -> str:
  """A local path with '~', '..' and symlinks resolved; a URL as it is written."""
  if paths.is_url(path):
    return str(path).rstrip('/')
  return os.path.realpath(os.path.expanduser(path))


def _run(config, run_dir: workdir_lib.Workdir, preemption: loop.Preemption,
         method=None) -> dict:
  # --- pretrained backbone
  pretrained = _load_pretrained(config, _pretrained_step(config, run_dir, run_dir.path),
                                method)
  backbone = load_backbone(config, pretrained)
  loaded = jax.tree.map(np.array, backbone.variables)     # host copy for the final check
  data = _resolve_data(config.data, pretrained.config.data)
  aug = _train_aug(config, pretrained.config.aug)
  linear = config.mode == 'linear'

  # --- mesh and data
  layout = loop.layout(config.global_batch_size, config.eval_batch_size,
                       'config.eval_batch_size')
  train_data, num_examples, num_classes = _labelled_data(config, data, layout)
  steps_per_epoch = num_examples / config.global_batch_size
  num_steps = loop.total_steps(config.num_epochs, steps_per_epoch)

  # --- state
  opt = loop.optimizer(config.optim, config.global_batch_size, steps_per_epoch, num_steps)
  classifier = make_classifier(num_classes)
  state = init_state(config.mode, classifier, opt.tx, backbone, config.seed)
  frozen = backbone.variables['params'] if linear else {}
  state, frozen = jax.device_put((state, frozen), parallel.replicated(layout.mesh))
  record = workdir_lib.config_record(config)
  record.update(data=data.to_dict(), pretrained_step=pretrained.step)
  state, start_step, saved_run = run_dir.resume(state, record)
  kept = f' with {config.head_layers} head layer(s)' if config.head_layers else ''
  say(f'{config.mode} on {paths.resolve(config.pretrained)} (step {pretrained.step}, '
      f'{"frozen" if linear else "trained"} backbone{kept}): {num_examples} '
      f'training images ({100 * config.label_fraction:g}% of the labels), '
      f'{num_classes} classes, {layout.mesh.devices.size} device(s), global batch '
      f'{config.global_batch_size}.')

  # --- loop
  step = parallel.per_replica(
      make_train_step(config.mode, backbone.module if linear else backbone.cross_replica,
                      classifier, opt.tx, opt.schedule,
                      aug, data.image_size, crop=data.in_memory, seed=config.seed),
      layout.mesh, in_specs=(P(), P(), P(AXIS)), out_specs=(P(), P()), donate_argnums=(0,))
  batches = (train_data.batches(start_step) if data.in_memory else
             _streamed_batches(config, data, aug, layout.local_batch,
                               loop.input_position(saved_run, start_step,
                                                    layout.local_batch)))
  say(f'Training steps {start_step} -> {num_steps} ({steps_per_epoch:.4g} per epoch), '
      f'peak learning rate {opt.peak_lr:.4g}, {config.optim.schedule} schedule.')
  state = loop.train(
      run_dir, state, lambda state, batch: step(state, frozen, batch), batches,
      layout.mesh, start_step=start_step, num_steps=num_steps,
      steps_per_epoch=steps_per_epoch, global_batch=config.global_batch_size,
      log_every=config.log_every_steps, checkpoint_every=config.checkpoint_every_steps,
      preemption=preemption, prefetch=data.prefetch,
      console=(('train top-1', 'train_accuracy', '.3f'), ('lr', 'learning_rate', '.4g')))

  # --- evaluation
  eval_step = parallel.per_replica(
      make_eval_step(config.mode, backbone.module, classifier, aug), layout.mesh,
      in_specs=(P(), P(AXIS)), out_specs=P(AXIS))
  logits, labels = features_lib.extract_features(
      eval_step, (state, frozen),
      eval_data.batches(data, eval_data.load_split(data, 'eval'), layout.eval_local_batch),
      layout.mesh, layout.eval_local_batch, (data.image_size, data.image_size, 3))
  results = {
      **{f'top{k}_accuracy': top_k_accuracy(logits, labels, k) for k in TOP_K},
      'num_eval_images': int(len(labels)), 'num_train_images': int(num_examples),
      'mode': config.mode, 'head_layers': config.head_layers,
      'label_fraction': config.label_fraction,
      'epochs': config.num_epochs, 'steps': num_steps,
      'pretrained': str(paths.resolve(config.pretrained)), 'pretrained_step': pretrained.step,
  }
  if linear:
    _check_backbone_unchanged(loaded, {'params': frozen, **state.model_state})
    results['backbone_unchanged'] = True
    say(f'Backbone parameters and BatchNorm statistics are bit-identical to the '
        f'pretrained checkpoint of step {pretrained.step}.')
  run_dir.write_results('downstream.json', num_steps, results,
                        {f'eval/top{k}_accuracy': results[f'top{k}_accuracy'] for k in TOP_K})
  say(format_results(results))
  return results


def _check_backbone_unchanged(loaded, used) -> None:
  """Raises unless every backbone array used is bit-identical to the loaded one."""
  used = jax.device_get(used)
  same = (jax.tree.structure(loaded) == jax.tree.structure(used) and
          all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(loaded),
                                                   jax.tree.leaves(used))))
  if not same:
    raise RuntimeError('The frozen backbone changed during linear evaluation.')


def format_results(results: dict) -> str:
  return '\n'.join([
      f'{results["mode"].capitalize()} evaluation, {100 * results["label_fraction"]:g}% '
      f'of the labels ({results["num_train_images"]} images), {results["epochs"]:g} '
      f'epochs; eval split of {results["num_eval_images"]} images:',
      f'  {"top-1":<8}{100 * results["top1_accuracy"]:>7.2f}%',
      f'  {"top-5":<8}{100 * results["top5_accuracy"]:>7.2f}%'])


if __name__ == '__main__':
  command_line.run_config_command(train_and_evaluate, 'Downstream config file.')

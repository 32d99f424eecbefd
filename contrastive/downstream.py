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

The data config defaults to the pretraining run's (every ``config.data`` field
left unset is inherited). In-memory datasets are held whole by every process, and
crops and flips run on the device; streamed datasets (``data.in_memory=False``)
go through the tf.data pipeline and need ``label_fraction=1``: for ImageNet's
standard 1% / 10% subsets use the TFDS builder ``imagenet2012_subset/1pct``
(or ``10pct``) as ``data.name``.
"""

import json
import os

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app
from absl import flags
from jax.sharding import PartitionSpec as P
from ml_collections import config_dict
from ml_collections import config_flags
from PIL import Image

from contrastive import command_line
from contrastive import checkpoint
from contrastive import config as config_lib
from contrastive import export
from contrastive import metrics as metrics_lib
from contrastive import optim
from contrastive import parallel
from contrastive.data import augment
from contrastive.data import sources
from contrastive.evaluate import features as features_lib

AXIS = parallel.AXIS
MODES = ('linear', 'finetune')
TOP_K = (1, 5)


def downstream_config() -> ml_collections.ConfigDict:
  """Every field of a downstream run, with its default."""
  config = ml_collections.ConfigDict()
  config.pretrained = ''                   # workdir of the pretraining run (required)
  config.pretrained_step = config_dict.placeholder(int)  # None: its latest checkpoint
  config.mode = 'linear'                   # 'linear' or 'finetune'
  config.label_fraction = 1.0              # class-balanced subset of the training labels
  config.subset_seed = 0                   # fixes that subset, whatever config.seed is
  config.seed = 0
  config.global_batch_size = 256
  config.num_epochs = 100.0
  config.log_every_steps = 50
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 2
  config.eval_batch_size = 512

  # Unset (None) fields take the pretraining run's value.
  config.data = ml_collections.ConfigDict()
  pretraining_data = config_lib.base_config().data
  for name in pretraining_data.keys():
    config.data[name] = config_dict.placeholder(pretraining_data.get_ref(name).get_type())

  # Training images get a random resized crop and a flip, nothing else; evaluation
  # images a centre crop of data.eval_crop_fraction.
  config.aug = ml_collections.ConfigDict()
  config.aug.crop_area = (0.08, 1.0)
  config.aug.crop_aspect = (3 / 4, 4 / 3)
  config.aug.flip_prob = 0.5

  config.optim = ml_collections.ConfigDict()
  config.optim.name = 'sgd'                # any of contrastive.optim.OPTIMIZERS
  config.optim.base_lr = 0.1
  config.optim.lr_scaling = 'linear'       # 'linear' (x B/256), 'sqrt' (x sqrt B), 'none'
  config.optim.momentum = 0.9
  config.optim.nesterov = False
  config.optim.weight_decay = 0.0          # kernels only, never biases or BN
  config.optim.trust_coefficient = 1e-3    # LARS only
  config.optim.warmup_epochs = 0.0          # linear warmup from 0, then the schedule
  config.optim.schedule = 'cosine'         # 'cosine' to 0, or 'steps'
  config.optim.decay_epochs = (60.0, 80.0)  # 'steps': lr x decay_factor at each
  config.optim.decay_factor = 0.1
  return config


class DownstreamState(flax.struct.PyTreeNode):
  """What a downstream checkpoint holds. In linear mode ``params`` is only the
  classifier and ``batch_stats`` the frozen backbone's statistics; the frozen
  backbone parameters are reloaded from the pretraining workdir."""
  step: jax.Array
  params: dict
  batch_stats: dict
  opt_state: optax.OptState


say = metrics_lib.say


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


class LabelledTrainData:
  """Labelled training batches from images that every process holds in memory.

  Global batch ``s`` is the window ``[s B, (s + 1) B)`` of an endless stream of
  per-epoch permutations drawn from ``(seed, epoch)``: a batch is a pure function
  of the step (a resumed run sees the batches it would have seen), the same for
  any number of processes, and a subset smaller than one batch still works. Each
  process returns the rows of its own devices.
  """

  def __init__(self, images, labels, mesh, global_batch: int, seed: int):
    self._images, self._labels = images, labels
    self._per_device = global_batch // mesh.devices.size
    self._positions = parallel.local_device_positions(mesh)
    self._global_batch = global_batch
    self._seed = seed
    self._orders = {}

  def _order(self, epoch: int) -> np.ndarray:
    if epoch not in self._orders:
      # A batch spans at most a few epochs: keep only the latest orders.
      self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
      self._orders[epoch] = np.random.default_rng([self._seed, epoch]).permutation(
          len(self._labels))
    return self._orders[epoch]

  def batch(self, step: int) -> dict:
    n = len(self._labels)
    stream = np.arange(step * self._global_batch, (step + 1) * self._global_batch)
    rows = np.empty(self._global_batch, np.int64)
    for epoch in np.unique(stream // n):
      here = stream // n == epoch
      rows[here] = self._order(int(epoch))[stream[here] % n]
    local = np.concatenate([rows[p * self._per_device:(p + 1) * self._per_device]
                            for p in self._positions])
    return {'image': self._images[local], 'label': self._labels[local]}


def centre_crop(images: np.ndarray, fraction: float) -> np.ndarray:
  """The central ``fraction`` of each image, resized back to its size (bicubic):
  the in-memory counterpart of the streamed pipeline's resize + centre crop."""
  if fraction == 1:
    return images
  size = images.shape[1]
  side = size * fraction
  box = ((size - side) / 2, (size - side) / 2, (size + side) / 2, (size + side) / 2)
  return np.stack([np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC,
                                                            box=box))
                   for image in images])


def _resolve_data(overrides, pretraining) -> ml_collections.ConfigDict:
  data = ml_collections.ConfigDict(pretraining.to_dict())
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


def init_state(mode: str, classifier, tx, pretrained, seed: int) -> DownstreamState:
  """A new classifier (and, fine-tuning, the pretrained backbone) and its optimizer
  state, a pure function of ``seed``: one compiled function rather than many small
  eager ops, drawn with an RBG key, which compiles several times faster than
  threefry on CPU."""

  @jax.jit
  def initialize(key, variables):
    features = jnp.zeros((1, pretrained.encoder.num_features))
    params = {'classifier': classifier.init(key, features)['params']}
    if mode == 'finetune':
      params['encoder'] = variables['params']
    return DownstreamState(step=jnp.zeros((), jnp.int32), params=params,
                           batch_stats=variables['batch_stats'], opt_state=tx.init(params))

  return initialize(jax.random.key(seed, impl='rbg'), pretrained.variables)


def make_train_step(mode: str, encoder, classifier, tx, schedule, aug, image_size: int,
                    crop: bool, seed: int):
  """The per-replica train step ``(state, frozen, batch) -> (state, scalars)``.

  ``frozen`` is the backbone's params in linear mode (an empty dict otherwise).
  Each image's crop and flip come from its position in the global batch, so the
  result does not depend on how the batch is split across devices.
  """
  finetune = mode == 'finetune'
  if finetune:
    encoder = encoder.clone(bn_axis_name=AXIS)

  def train_step(state: DownstreamState, frozen, batch):
    step_key = jax.random.fold_in(jax.random.key(seed), state.step)
    local = batch['label'].shape[0]
    positions = jax.lax.axis_index(AXIS) * local + jnp.arange(local)
    keys = jax.vmap(jax.random.fold_in, (None, 0))(step_key, positions)
    images = augment.augment_images(keys, batch['image'], aug, image_size, crop=crop)
    if not finetune:
      features = encoder.apply({'params': frozen, 'batch_stats': state.batch_stats},
                               images, train=False)

    def loss_fn(params):
      batch_stats = state.batch_stats
      if finetune:
        x, updates = encoder.apply({'params': params['encoder'], 'batch_stats': batch_stats},
                                   images, train=True, mutable=['batch_stats'])
        batch_stats = updates['batch_stats']
      else:
        x = features
      logits = classifier.apply({'params': params['classifier']}, x)
      # pmean makes the loss the global-batch loss on every replica; under shard_map
      # the gradient with respect to replicated params is then the global gradient
      # (the transpose of the replicated -> per-replica broadcast sums the replicas).
      loss = jax.lax.pmean(optax.softmax_cross_entropy_with_integer_labels(
          logits, batch['label']).mean(), AXIS)
      return loss, (batch_stats, logits)

    (loss, (batch_stats, logits)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(step=state.step + 1,
                              params=optax.apply_updates(state.params, updates),
                              batch_stats=batch_stats, opt_state=opt_state)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch['label'])
    return new_state, {'loss': loss, 'learning_rate': schedule(state.step),
                       'train_accuracy': jax.lax.pmean(accuracy, AXIS)}

  return train_step


def make_eval_step(mode: str, encoder, classifier, aug):
  """The per-replica ``((state, frozen), images) -> logits``, BN in inference mode."""

  def eval_step(state_and_frozen, images):
    state, frozen = state_and_frozen
    backbone = state.params['encoder'] if mode == 'finetune' else frozen
    features = encoder.apply({'params': backbone, 'batch_stats': state.batch_stats},
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
  path = os.path.join(workdir, 'config.json')
  if manager.latest_step() is not None and os.path.exists(path):
    with open(path) as f:
      return json.load(f).get('pretrained_step')
  return None


def _check_config(config) -> None:
  """The errors a run can tell before it loads anything."""
  if not config.pretrained:
    raise ValueError('config.pretrained is empty: set it to the workdir of a pretraining '
                     'run, e.g. --config.pretrained=/tmp/quickstart.')
  if not os.path.isdir(config.pretrained):
    raise FileNotFoundError(f'config.pretrained={config.pretrained!r} is not a directory: '
                            'it must be the workdir of a pretraining run.')
  if config.mode not in MODES:
    raise ValueError(f'config.mode={config.mode!r}; valid: {", ".join(MODES)}')
  if not 0 < config.label_fraction <= 1:
    raise ValueError(f'config.label_fraction={config.label_fraction} must be in (0, 1].')


def _load_pretrained(config, step):
  try:
    return export.load_pretrained(config.pretrained, step)
  except FileNotFoundError as err:
    raise FileNotFoundError(f'config.pretrained={config.pretrained!r}: {err}') from err


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains the classifier (and, fine-tuning, the backbone); returns the figures
  written to ``workdir/downstream.json``."""
  _check_config(config)
  manager = checkpoint.make_manager(workdir, config.keep_checkpoints)
  try:
    return _run(config, workdir, manager)
  finally:
    # An exception (not a kill) still lets the checkpoint in flight complete.
    checkpoint.finish(manager)


def _run(config, workdir: str, manager) -> dict:
  # --- pretrained backbone
  pretrained = _load_pretrained(config, _pretrained_step(config, manager, workdir))
  loaded = jax.tree.map(np.array, pretrained.variables)   # host copy for the final check
  data = _resolve_data(config.data, pretrained.config.data)
  aug = _train_aug(config, pretrained.config.aug)
  linear = config.mode == 'linear'

  # --- mesh
  mesh = parallel.make_mesh()
  local_batch = parallel.check_global_batch(config.global_batch_size, mesh)
  eval_local_batch = parallel.check_global_batch(config.eval_batch_size, mesh,
                                                 'config.eval_batch_size')

  # --- data
  if data.in_memory:
    train_split = sources.load_arrays(data, 'train')
    num_classes = train_split.num_classes
    if train_split.labels is None:
      raise ValueError('Downstream training needs labels, and the training split has none.')
    subset = label_subset(train_split.labels, config.label_fraction, config.subset_seed)
    num_examples = len(subset)
    train_data = LabelledTrainData(train_split.images[subset], train_split.labels[subset],
                                   mesh, config.global_batch_size, config.seed)
    next_batch = train_data.batch
  else:
    if config.label_fraction != 1:
      raise ValueError(
          f'config.label_fraction={config.label_fraction} needs data.in_memory=True; '
          'for ImageNet use the standard subsets instead: '
          '--config.data.name=imagenet2012_subset/1pct (or 10pct) '
          '--config.label_fraction=1.0.')
    info = sources.split_info(data, 'train')
    num_classes, num_examples = info.num_classes, info.num_examples
  if num_classes is None:
    raise ValueError('Downstream training needs labels, and the training split has none.')
  steps_per_epoch = num_examples / config.global_batch_size
  total_steps = max(1, int(round(config.num_epochs * steps_per_epoch)))

  # --- state
  peak_lr = optim.scaled_learning_rate(config.optim, config.global_batch_size)
  schedule = optim.schedule_from_config(config.optim, peak_lr, steps_per_epoch, total_steps)
  tx = optim.make_optimizer(config.optim, schedule)
  classifier = make_classifier(num_classes)
  state = init_state(config.mode, classifier, tx, pretrained, config.seed)
  frozen = pretrained.variables['params'] if linear else {}
  state, frozen = jax.device_put((state, frozen), parallel.replicated(mesh))

  # --- restore
  state = checkpoint.restore_or_keep(manager, state)
  start_step = int(jax.device_get(state.step))
  if start_step:
    say(f'Resuming from the checkpoint of step {start_step} in {manager.directory}.')
  _record_config(config, data, pretrained.step, workdir)
  say(f'{config.mode} on {os.path.abspath(config.pretrained)} (step {pretrained.step}, '
      f'{"frozen" if linear else "trained"} backbone): {num_examples} '
      f'training images ({100 * config.label_fraction:g}% of the labels), '
      f'{num_classes} classes, {mesh.devices.size} device(s), global batch '
      f'{config.global_batch_size}.')

  # --- step
  image_size = data.image_size
  train_step = parallel.per_replica(
      make_train_step(config.mode, pretrained.encoder, classifier, tx, schedule, aug,
                      image_size, crop=data.in_memory, seed=config.seed),
      mesh, in_specs=(P(), P(), P(AXIS)), out_specs=(P(), P()), donate_argnums=(0,))
  if not data.in_memory:
    from contrastive.data import pipeline  # pylint: disable=g-import-not-at-top
    # The host pipeline crops and flips; a restart reshuffles from a seed tied to
    # the resume step, as the pretraining trainer does.
    stream = pipeline.train_iterator(data, aug, local_batch, seed=config.seed + start_step,
                                     shard_index=jax.process_index(),
                                     shard_count=jax.process_count())

    def next_batch(step):
      del step
      views = next(stream)
      return {'image': views['view1'], 'label': views['label']}

  # --- loop
  writer = metrics_lib.MetricWriter(workdir)
  log = metrics_lib.StepLogger(
      writer, start_step, total_steps, config.global_batch_size, steps_per_epoch,
      config.log_every_steps, manager.directory,
      console=(('train top-1', 'train_accuracy', '.3f'), ('lr', 'learning_rate', '.4g')))
  say(f'Training steps {start_step} -> {total_steps} ({steps_per_epoch:.4g} per epoch), '
      f'peak learning rate {peak_lr:.4g}, {config.optim.schedule} schedule.')
  for step in range(start_step, total_steps):
    batch = parallel.host_to_global(next_batch(step), mesh)
    state, scalars = train_step(state, frozen, batch)
    done = step + 1
    log.after_step(done, scalars)
    if done % config.checkpoint_every_steps == 0 or done == total_steps:
      checkpoint.save(manager, state)

  # --- evaluation
  eval_step = parallel.per_replica(
      make_eval_step(config.mode, pretrained.encoder, classifier, aug), mesh,
      in_specs=(P(), P(AXIS)), out_specs=P(AXIS))
  image_shape = (image_size, image_size, 3)
  logits, labels = features_lib.extract_features(
      eval_step, (state, frozen), _eval_batches(data, eval_local_batch), mesh,
      eval_local_batch, image_shape)
  results = {
      **{f'top{k}_accuracy': top_k_accuracy(logits, labels, k) for k in TOP_K},
      'num_eval_images': int(len(labels)), 'num_train_images': int(num_examples),
      'mode': config.mode, 'label_fraction': config.label_fraction,
      'epochs': config.num_epochs, 'steps': total_steps,
      'pretrained': os.path.abspath(config.pretrained), 'pretrained_step': pretrained.step,
  }
  if linear:
    _check_backbone_unchanged(loaded, {'params': frozen, 'batch_stats': state.batch_stats})
    results['backbone_unchanged'] = True
    say(f'Backbone parameters and BatchNorm statistics are bit-identical to the '
        f'pretrained checkpoint of step {pretrained.step}.')
  writer.write(total_steps, {f'eval/top{k}_accuracy': results[f'top{k}_accuracy']
                             for k in TOP_K})
  writer.close()
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'downstream.json'), 'w') as f:
      json.dump(results, f, indent=2)
  say(format_results(results))
  return results


def _eval_batches(data, local_batch: int):
  """This process's block of the eval split: padded in-memory batches, or streamed."""
  if data.in_memory:
    arrays = sources.load_arrays(data, 'eval', shard_index=jax.process_index(),
                                 shard_count=jax.process_count())
    images = centre_crop(arrays.images, float(data.eval_crop_fraction))
    return features_lib.padded_batches(images, arrays.labels, local_batch)
  from contrastive.data import pipeline  # pylint: disable=g-import-not-at-top
  return pipeline.eval_iterator(data, 'eval', local_batch, jax.process_index(),
                                jax.process_count())


def _check_backbone_unchanged(loaded, used) -> None:
  """Raises unless every backbone array used is bit-identical to the loaded one."""
  used = jax.device_get(used)
  same = (jax.tree.structure(loaded) == jax.tree.structure(used) and
          all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(loaded),
                                                   jax.tree.leaves(used))))
  if not same:
    raise RuntimeError('The frozen backbone changed during linear evaluation.')


def _record_config(config, data, pretrained_step: int, workdir: str) -> None:
  """config.json with the data config and pretrained step actually used."""
  if jax.process_index() != 0:
    return
  record = config.to_dict()
  record.update(data=data.to_dict(), pretrained_step=pretrained_step)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump(record, f, indent=2, sort_keys=True, default=str)


def format_results(results: dict) -> str:
  return '\n'.join([
      f'{results["mode"].capitalize()} evaluation, {100 * results["label_fraction"]:g}% '
      f'of the labels ({results["num_train_images"]} images), {results["epochs"]:g} '
      f'epochs; eval split of {results["num_eval_images"]} images:',
      f'  {"top-1":<8}{100 * results["top1_accuracy"]:>7.2f}%',
      f'  {"top-5":<8}{100 * results["top5_accuracy"]:>7.2f}%'])


# ----------------------------------------------------------------------------- command line

def _run_command(argv):
  values = flags.FLAGS

  def work():
    if values.distributed:
      jax.distributed.initialize(coordinator_address=values.coordinator_address,
                                 num_processes=values.num_processes,
                                 process_id=values.process_id)
    train_and_evaluate(values.config, values.workdir)

  command_line.run(argv, work)


def main():
  """``python -m contrastive.downstream``.

  The flags are defined here rather than at import, so that importing this module
  (the config files do) leaves the importing program's flags alone.
  """
  config_flags.DEFINE_config_file('config', None, 'Downstream config file.',
                                  lock_config=True)
  flags.DEFINE_string('workdir', None, 'Checkpoints, metrics, results.')
  flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() (multi-host '
                    'runs; the coordinator is auto-detected on TPU pods, SLURM and '
                    'Open MPI).')
  flags.DEFINE_string('coordinator_address', None,
                      'host:port of process 0, where not auto-detected.')
  flags.DEFINE_integer('num_processes', None, 'Where not auto-detected.')
  flags.DEFINE_integer('process_id', None, 'Where not auto-detected.')
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(_run_command)


if __name__ == '__main__':
  main()

"""The trainer, one function read top to bottom: :func:`train_and_evaluate`.

Sections: mesh, data, state, restore, step, loop, evaluation. Nothing here is
specific to one method; methods plug in through :mod:`contrastive.methods`.
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from contrastive import checkpoint
from contrastive import metrics as metrics_lib
from contrastive import models
from contrastive import optim
from contrastive import parallel
from contrastive.data import augment
from contrastive.data import sources
from contrastive.evaluate import features as features_lib
from contrastive.evaluate import knn
from contrastive.evaluate import linear_probe
from contrastive.evaluate import online_probe
from contrastive.methods import RunInfo, TrainState, get_method

AXIS = parallel.AXIS
say = metrics_lib.say


# ----------------------------------------------------------------------------- data

class InMemoryTrainData:
  """Training batches from a dataset held in host memory.

  The split is cut into one contiguous block per device of the mesh, and each
  device draws its part of every global batch from its own block, in an order
  fixed by (seed, epoch, device position). A process therefore loads only its
  devices' blocks, a batch is a pure function of the step (so a resumed run sees
  exactly the batches it would have seen), and a 2-process x 4-device run sees the
  same global batches as a 1-process x 8-device one.
  """

  def __init__(self, data_config, mesh, per_device_batch: int, seed: int):
    num_devices = mesh.devices.size
    self._positions = parallel.local_device_positions(mesh)
    blocks = [sources.load_arrays(data_config, 'train', shard_index=d,
                                  shard_count=num_devices) for d in self._positions]
    self._blocks = blocks
    self._images = [block.images for block in blocks]
    self._labels = [np.full(len(block.images), -1, np.int32) if block.labels is None
                    else block.labels for block in blocks]
    self.num_classes = blocks[0].num_classes
    skipped = sum(block.skipped for block in blocks)
    local_size = sum(len(images) for images in self._images)
    self.num_examples = int(np.sum(multihost_utils.process_allgather(
        np.asarray(local_size))))
    self.skipped = int(np.sum(multihost_utils.process_allgather(np.asarray(skipped))))
    # Where each device's block starts in the split: images carry their split index.
    self._starts = [sources.shard_bounds(self.num_examples, d, num_devices)[0]
                    for d in self._positions]
    # Blocks differ in size by at most one image: all use the smallest length.
    self._block_length = self.num_examples // num_devices
    self._batch = per_device_batch
    self._seed = seed
    self.steps_per_epoch = self._block_length // per_device_batch
    if self.steps_per_epoch == 0:
      raise ValueError(
          f'The training split has {self.num_examples} images, fewer than one global '
          f'batch of {per_device_batch * num_devices}: lower config.global_batch_size.')
    self._orders = (None, None)

  def _order(self, epoch: int):
    if self._orders[0] != epoch:
      self._orders = (epoch, [
          np.random.default_rng([self._seed, epoch, position]).permutation(
              self._block_length) for position in self._positions])
    return self._orders[1]

  def process_block(self) -> sources.ImageArrays:
    """This process's block of the split, in the split's order, for evaluation.

    The device blocks are nested in the process block, so concatenating them in
    position order gives exactly ``load_arrays(..., process_index, process_count)``.
    """
    labels = [block.labels for block in self._blocks]
    return sources.ImageArrays(
        images=np.concatenate(self._images),
        labels=None if labels[0] is None else np.concatenate(labels),
        num_classes=self._blocks[0].num_classes, skipped=self.skipped)

  def batch(self, step: int) -> dict:
    """``image`` uint8 [b, H, W, 3], ``label`` (-1: none) and ``index`` (position
    in the split) of a step."""
    epoch, position = divmod(step, self.steps_per_epoch)
    window = slice(position * self._batch, (position + 1) * self._batch)
    rows = [order[window] for order in self._order(epoch)]
    return {
        'image': np.concatenate([images[r] for images, r in zip(self._images, rows)]),
        'label': np.concatenate([labels[r] for labels, r in zip(self._labels, rows)]),
        'index': np.concatenate([start + r for start, r in zip(self._starts, rows)]
                                ).astype(np.int32),
    }


def device_views(step_key, batch, aug, image_size: int):
  """Two augmented views of this replica's images.

  Each image's randomness comes from its position in the global batch, so the
  views do not depend on how the batch is split across devices.
  """
  if 'image' in batch:          # in-memory data: crop and flip happen here too
    pixels1 = pixels2 = batch['image']
    crop = True
  else:                         # the host pipeline already cropped and flipped
    pixels1, pixels2, crop = batch['view1'], batch['view2'], False
  local = pixels1.shape[0]
  positions = jax.lax.axis_index(AXIS) * local + jnp.arange(local)
  image_keys = jax.vmap(jax.random.fold_in, (None, 0))(step_key, positions)

  def one_view(view: int, pixels):
    keys = jax.vmap(jax.random.fold_in, (0, None))(image_keys, view)
    return augment.augment_images(keys, pixels, aug, image_size, crop=crop)

  return one_view(1, pixels1), one_view(2, pixels2)


# ----------------------------------------------------------------------------- step

def make_train_step(method, model, config, run: RunInfo, tx, schedule, image_size: int,
                    probe: online_probe.OnlineProbe | None = None):
  """The per-replica train step, to be mapped over the mesh.

  With a ``probe``, the online linear probe takes one step on the features of
  the method's own forward pass, after (and apart from) the encoder's gradients.
  """

  def train_step(state: TrainState, batch):
    step_key = jax.random.fold_in(jax.random.key(config.seed), state.step)
    view1, view2 = device_views(step_key, batch, config.aug, image_size)
    inputs = {'view1': view1, 'view2': view2, 'index': batch['index']}
    # Images draw keys at positions 0..B-1 of the step key; the method the next one.
    method_key = jax.random.fold_in(step_key, config.global_batch_size)

    def loss_fn(params):
      return method.loss(model, params, state.batch_stats, state.method_state, inputs,
                         method_key, config, run, AXIS)

    # The loss is already the global-batch loss on every replica (pmean inside),
    # so under shard_map its gradient is the global gradient: no pmean here.
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    batch_stats = aux['batch_stats']
    if config.model.bn == 'local':
      batch_stats = jax.lax.pmean(batch_stats, AXIS)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    method_state = method.update_method_state(state.method_state, params, aux['for_update'],
                                              state.step, config, run, AXIS)
    scalars = {'loss': loss, 'learning_rate': schedule(state.step),
               'grad_norm': optax.tree.norm(grads), **aux['metrics']}
    probe_state = state.probe
    if probe is not None:
      probe_state, probe_scalars = online_probe.update(probe, state.probe, aux['features'],
                                                       batch['label'], AXIS)
      scalars.update(probe_scalars)
    new_state = state.replace(step=state.step + 1, params=params,
                              batch_stats=batch_stats, opt_state=opt_state,
                              method_state=method_state, probe=probe_state)
    return new_state, scalars

  return train_step


def make_encode_step(method, model, config):
  def encode_step(state: TrainState, images):
    pixels = augment.preprocess_eval(images, config.aug)
    return method.encode(model, state.params, state.batch_stats, pixels)
  return encode_step


def state_specs(method, config) -> TrainState:
  """How the state lies on the mesh: replicated, except the method's sharded rows."""
  return TrainState(step=P(), params=P(), batch_stats=P(), opt_state=P(),
                    method_state=method.state_specs(config), probe=P())


def init_state(method, model, tx, config, image_shape, run: RunInfo, mesh,
               probe: online_probe.OnlineProbe | None = None) -> TrainState:
  """Random initial state on ``mesh``, a pure function of ``config.seed``."""
  # Initialise outside the per-replica step: BatchNorm must not look for the axis.
  local_model = models.with_bn_axis(model, None)
  shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec),
                           state_specs(method, config), is_leaf=lambda x: isinstance(x, P))

  @functools.partial(jax.jit, out_shardings=shardings)
  def initialize(params_key, method_key):
    variables = local_model.init(params_key, jnp.zeros((2, *image_shape)), train=False)
    params = variables['params']
    probe_state = ({} if probe is None else online_probe.init(
        probe, jax.random.fold_in(method_key, 1), model.encoder.num_features))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables['batch_stats'], opt_state=tx.init(params),
                      method_state=method.init_method_state(config, variables, run,
                                                            method_key),
                      probe=probe_state)

  # RBG keys compile the hundreds of parameter initialisers several times faster
  # than threefry. The method's state (queues, banks) is created sharded, and
  # threefry draws do not depend on how an array is split across devices.
  return initialize(jax.random.key(config.seed, impl='rbg'),
                    jax.random.fold_in(jax.random.key(config.seed), 1))


# ----------------------------------------------------------------------------- main

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Pretrains, checkpoints, and ends with kNN / linear-probe figures.

  Restarting with the same ``workdir`` resumes from its latest checkpoint.
  Returns the final evaluation figures (empty when evaluation is off).
  """
  # --- mesh
  mesh = parallel.make_mesh()
  local_batch = parallel.check_global_batch(config.global_batch_size, mesh)
  per_device_batch = config.global_batch_size // mesh.devices.size
  method = get_method(config.method)
  model = method.build_model(config)
  say(f'{jax.process_count()} process(es), {mesh.devices.size} device(s) '
      f'({jax.devices()[0].platform}); global batch {config.global_batch_size}.')

  # --- data
  image_size = config.data.image_size
  if config.data.in_memory:
    train_data = InMemoryTrainData(config.data, mesh, per_device_batch, config.seed)
    steps_per_epoch = train_data.steps_per_epoch
    num_examples, num_classes = train_data.num_examples, train_data.num_classes
    say(f'Training split: {train_data.num_examples} images in host memory'
        + (f' ({train_data.skipped} unreadable file(s) skipped).' if train_data.skipped
           else '.'))
  else:
    from contrastive.data import pipeline  # pylint: disable=g-import-not-at-top
    info = sources.split_info(config.data, 'train')
    num_examples, num_classes = info.num_examples, info.num_classes
    steps_per_epoch = num_examples // config.global_batch_size
  total_steps = max(1, int(round(config.num_epochs * steps_per_epoch)))
  run = RunInfo(num_examples=num_examples, num_devices=mesh.devices.size,
                global_batch_size=config.global_batch_size, total_steps=total_steps)

  # --- state
  peak_lr = optim.scaled_learning_rate(config.optim, config.global_batch_size)
  schedule = optim.schedule_from_config(config.optim, peak_lr, steps_per_epoch, total_steps)
  tx = optim.make_optimizer(config.optim, schedule)
  probe = (online_probe.create(num_classes, config.eval.online_probe_learning_rate)
           if config.eval.online_probe and num_classes else None)
  image_shape = (image_size, image_size, 3)
  state = init_state(method, model, tx, config, image_shape, run, mesh, probe)

  # --- restore
  manager = checkpoint.make_manager(workdir, config.keep_checkpoints)
  state = checkpoint.restore_or_keep(manager, state)
  start_step = int(jax.device_get(state.step))
  if start_step:
    say(f'Resuming from the checkpoint of step {start_step} in {manager.directory}.')
  _record_config(config, workdir, resumed=start_step > 0)

  # --- step
  train_step = parallel.per_replica(
      make_train_step(method, model, config, run, tx, schedule, image_size, probe), mesh,
      in_specs=(state_specs(method, config), P(AXIS)),
      out_specs=(state_specs(method, config), P()), donate_argnums=(0,))
  if config.data.in_memory:
    next_batch = train_data.batch
  else:
    # A streamed run restarted mid-way reshuffles from a seed tied to the resume
    # step: the data order differs from an uninterrupted run (in-memory runs don't).
    stream = pipeline.train_iterator(
        config.data, config.aug, local_batch, seed=config.seed + start_step,
        shard_index=jax.process_index(), shard_count=jax.process_count())
    next_batch = lambda step: next(stream)

  # --- evaluation inputs: labelled splits for the kNN monitor and the final figures
  knn_every = (max(1, int(round(config.eval.knn_every_epochs * steps_per_epoch)))
               if config.eval.knn_every_epochs > 0 else 0)
  if config.eval.enabled or knn_every:
    encode_step = parallel.per_replica(make_encode_step(method, model, config), mesh,
                                       in_specs=(state_specs(method, config), P(AXIS)),
                                       out_specs=P(AXIS))
    splits = eval_splits(config, mesh,
                         train_data.process_block() if config.data.in_memory else None)

  # --- loop
  writer = metrics_lib.MetricWriter(workdir)
  log = metrics_lib.StepLogger(writer, start_step, total_steps, config.global_batch_size,
                               steps_per_epoch, config.log_every_steps, manager.directory)
  say(f'Training steps {start_step} -> {total_steps} ({steps_per_epoch} per epoch), '
      f'peak learning rate {peak_lr:.4g}.')
  try:
    for step in range(start_step, total_steps):
      batch = parallel.host_to_global(next_batch(step), mesh)
      state, scalars = train_step(state, batch)
      done = step + 1
      log.after_step(done, scalars)
      if knn_every and (done % knn_every == 0 or done == total_steps):
        figures = monitor(state, encode_step, probe, config, splits)
        writer.write(done, figures)
        say(f'step {done}  ' + '  '.join(f'{name} {100 * value:.2f}%'
                                         for name, value in figures.items()))
      if done % config.checkpoint_every_steps == 0 or done == total_steps:
        checkpoint.save(manager, state)
  finally:
    # An exception (not a kill) still lets the checkpoint in flight complete.
    checkpoint.finish(manager)

  # --- evaluation
  results = {}
  if config.eval.enabled:
    encoders = {'trained': state}
    if config.eval.compare_random_init:
      encoders['random_init'] = init_state(method, model, tx, config, image_shape, run,
                                           mesh, probe)
    results = evaluate(encoders, encode_step, config, splits, probe)
    writer.write(total_steps, {f'{name}/{metric}': value
                               for name, figures in results.items()
                               for metric, value in figures.items()})
    if jax.process_index() == 0:
      with open(os.path.join(workdir, 'eval.json'), 'w') as f:
        json.dump(results, f, indent=2)
    say(format_results(results, config))
  writer.close()
  return results


def _record_config(config, workdir: str, resumed: bool) -> None:
  """Writes config.json; warns when a resumed run's config differs from it."""
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, 'config.json')
  text = config.to_json_best_effort(indent=2, sort_keys=True)
  if resumed and os.path.exists(path):
    with open(path) as f:
      before = _flatten(json.load(f))
    after = _flatten(json.loads(text))
    changed = sorted(key for key in before.keys() | after.keys()
                     if before.get(key) != after.get(key))
    if changed:
      say(f'WARNING: resuming with a config that differs from {path} in: '
          f'{", ".join(changed)}.')
  os.makedirs(workdir, exist_ok=True)
  with open(path, 'w') as f:
    f.write(text)


def _flatten(tree: dict, prefix: str = '') -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[prefix + key] = value
  return flat


# ----------------------------------------------------------------------------- eval

def eval_splits(config, mesh, train_split=None) -> dict:
  """The labelled 'train' and 'eval' splits that features are computed on.

  In memory: this process's block of each split (``train_split``: the training
  images already held, so they are not decoded a second time). Streamed: the
  splits' sizes; batches are read at each evaluation.
  """
  splits = {'train': (_eval_split(config.data, 'train') if train_split is None
                      else train_split),
            'eval': _eval_split(config.data, 'eval')}
  if splits['train'].num_classes is None:
    raise ValueError('Evaluation needs labels, and the training split has none: set '
                     'config.eval.enabled=False and config.eval.knn_every_epochs=0 '
                     'for an unlabelled dataset.')
  splits['local_batch'] = parallel.check_global_batch(config.eval.batch_size, mesh,
                                                     'config.eval.batch_size')
  splits['mesh'], splits['image_shape'] = mesh, (config.data.image_size,) * 2 + (3,)
  return splits


def split_features(state, encode_step, config, splits) -> dict:
  """(features, labels) of the whole 'train' and 'eval' splits, on every process."""
  local_batch = splits['local_batch']
  return {split: features_lib.extract_features(
      encode_step, state, _eval_batches(config.data, splits[split], local_batch),
      splits['mesh'], local_batch, splits['image_shape']) for split in ('train', 'eval')}


def monitor(state, encode_step, probe, config, splits) -> dict:
  """Figures during training: kNN top-1 and the online probe's top-1 on 'eval'."""
  features = split_features(state, encode_step, config, splits)
  (train_x, train_y), (eval_x, eval_y) = features['train'], features['eval']
  figures = {'monitor/knn_accuracy': knn.knn_accuracy(
      train_x, train_y, eval_x, eval_y, splits['train'].num_classes,
      k=config.eval.knn_k, temperature=config.eval.knn_temperature)}
  if probe is not None:
    figures['monitor/online_probe_accuracy'] = online_probe.accuracy(
        probe, parallel.host_copy(state.probe['params']), eval_x, eval_y)
  return figures


def evaluate(encoders: dict, encode_step, config, splits, probe=None) -> dict:
  """kNN and offline linear-probe top-1 on the eval split for each encoder state,
  and the online probe's top-1 for the 'trained' one (the only one it trained on)."""
  num_classes = splits['train'].num_classes
  results = {}
  for name, state in encoders.items():
    features = split_features(state, encode_step, config, splits)
    (train_x, train_y), (eval_x, eval_y) = features['train'], features['eval']
    offline = linear_probe.train_linear_probe(
        train_x, train_y, num_classes, epochs=config.eval.probe_epochs,
        learning_rate=config.eval.probe_learning_rate, seed=config.seed)
    results[name] = {
        'knn_accuracy': knn.knn_accuracy(
            train_x, train_y, eval_x, eval_y, num_classes, k=config.eval.knn_k,
            temperature=config.eval.knn_temperature),
        'linear_probe_accuracy': linear_probe.probe_accuracy(offline, eval_x, eval_y),
    }
    if probe is not None and name == 'trained':
      results[name]['online_probe_accuracy'] = online_probe.accuracy(
          probe, parallel.host_copy(state.probe['params']), eval_x, eval_y)
  return results


def _eval_split(data_config, split: str):
  """In memory: this process's block of the split; streamed: the split's size."""
  if not data_config.in_memory:
    return sources.split_info(data_config, split)
  return sources.load_arrays(data_config, split, shard_index=jax.process_index(),
                             shard_count=jax.process_count())


def _eval_batches(data_config, arrays, local_batch):
  if data_config.in_memory:
    return features_lib.padded_batches(arrays.images, arrays.labels, local_batch)
  from contrastive.data import pipeline  # pylint: disable=g-import-not-at-top
  return pipeline.eval_iterator(data_config, arrays.split, local_batch,
                                jax.process_index(), jax.process_count())


def format_results(results: dict, config) -> str:
  lines = [f'Evaluation on the held-out split ({config.eval.knn_k}-NN, temperature '
           f'{config.eval.knn_temperature}; linear probe {config.eval.probe_epochs} '
           'epochs):',
           f'  {"encoder":<16}{"kNN top-1":>12}{"linear top-1":>15}{"online probe":>15}']
  for name, figures in results.items():
    online = figures.get('online_probe_accuracy')
    lines.append(f'  {name:<16}{100 * figures["knn_accuracy"]:>11.2f}%'
                 f'{100 * figures["linear_probe_accuracy"]:>14.2f}%'
                 + ('' if online is None else f'{100 * online:>14.2f}%'))
  return '\n'.join(lines)

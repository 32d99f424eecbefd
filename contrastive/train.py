"""Pretraining, one function read top to bottom: :func:`train_and_evaluate`.

Sections: views, step, state, main, data pass. Nothing here is specific to one
method: a method is a :class:`contrastive.methods.Method`, and the loop, the
workdir and the optimizer are :mod:`contrastive.loop`'s, shared with downstream
evaluation; the kNN monitor and the final evaluation are
:mod:`contrastive.evaluate.monitor`'s.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from contrastive import config_checks
from contrastive import loop
from contrastive import parallel
from contrastive import workdir as workdir_lib
from contrastive.data import augment
from contrastive.data import evaluation as eval_data
from contrastive.data import in_memory
from contrastive.data import padding
from contrastive.data import sources
from contrastive.evaluate import monitor as monitor_lib
from contrastive.evaluate import online_probe
from contrastive.methods import Batch, Context, Method, RunInfo, TrainState, get_method
from contrastive.methods import contract

AXIS = parallel.AXIS
say = loop.say


# ----------------------------------------------------------------------------- views

def device_views(step_key, batch, views) -> tuple[jax.Array, ...]:
  """This replica's augmented images, one array per view the method declares
  (a view with a grid: its patches).

  Each image's randomness comes from its position in the global batch (and the
  view's number), so the views do not depend on how the batch is split across
  devices. In-memory batches carry ``image`` (crop and flip happen here too);
  streamed ones carry ``views``, already cropped and flipped by the host.
  """
  streamed = 'views' in batch
  pixels = batch['views'] if streamed else (batch['image'],) * len(views)
  image_keys = augment.global_image_keys(step_key, pixels[0].shape[0], AXIS)

  def one_view(number: int, images, view):
    keys = jax.vmap(jax.random.fold_in, (0, None))(image_keys, number)
    if view.grid is None:
      return augment.augment_images(keys, images, view.aug, view.size, crop=not streamed)
    grid = view.grid
    return augment.augment_patch_grid(keys, images, view.aug, view.size, grid.size,
                                      grid.stride, grid.aug, crop=not streamed)

  return tuple(one_view(v + 1, images, view)
               for v, (images, view) in enumerate(zip(pixels, views)))


# ----------------------------------------------------------------------------- step

def make_train_step(method: Method, ctx: Context, tx, schedule,
                    probe: online_probe.OnlineProbe | None = None):
  """The per-replica train step, to be mapped over the mesh.

  With a ``probe``, the online linear probe takes one step on the features of
  the method's own forward pass, after (and apart from) the encoder's gradients.
  """
  config = ctx.config
  views = method.views(config)

  sharded = method.param_specs(config)

  def train_step(state: TrainState, batch):
    step_key = jax.random.fold_in(jax.random.key(config.seed), state.step)
    inputs = Batch(views=device_views(step_key, batch, views), index=batch['index'])
    # Images draw keys at positions 0..B-1 of the step key; the method the next one.
    method_key = jax.random.fold_in(step_key, config.global_batch_size)

    def loss_fn(params):
      out = method.loss(ctx, params, state.model_state, state.method_state, inputs,
                        method_key)
      return out.loss, out

    # The loss is already the global-batch loss on every replica (pmean inside),
    # so under shard_map its gradient is the global gradient: no pmean here.
    (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    model_state = out.model_state
    if config.model.bn == 'local':
      model_state = contract.mean_statistics(model_state, AXIS)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    method_state = method.update_state(ctx, state.method_state, params, out.for_update,
                                       state.step)
    scalars = {'loss': loss, 'learning_rate': schedule(state.step),
               'grad_norm': global_norm(grads, sharded), **out.metrics}
    probe_state = state.probe
    if probe is not None:
      probe_state, probe_scalars = online_probe.update(probe, state.probe, out.features,
                                                       batch['label'], AXIS)
      scalars.update(probe_scalars)
    new_state = state.replace(params=params, model_state=model_state,
                              opt_state=opt_state, method_state=method_state,
                              probe=probe_state)
    if config.skip_nonfinite_steps:
      # A step whose loss or gradient is not finite leaves the state as it was
      # (the loss and the norm are global, so every replica decides alike).
      finite = jnp.isfinite(loss) & jnp.isfinite(scalars['grad_norm'])
      new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    return new_state.replace(step=state.step + 1), scalars

  return train_step


def global_norm(grads, sharded: dict):
  """The L2 norm of all gradients, the rows split across devices included."""
  squares = 0.0
  for name, value in grads.items():
    total = sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree.leaves(value))
    squares += jax.lax.psum(total, AXIS) if name in sharded else total
  return jnp.sqrt(squares)


def make_prior_step(ctx: Context, write):
  """The per-replica step of a method's initialisation from the data."""
  def prior_step(state: TrainState, batch):
    pixels = augment.preprocess_eval(batch['image'], ctx.config.aug)
    params, method_state = write(ctx, state.params, state.model_state, state.method_state,
                                 pixels, batch['index'], batch['mask'])
    return state.replace(params=params, method_state=method_state)
  return prior_step


def make_epoch_step(ctx: Context, start_epoch):
  """The per-replica program a method runs before every epoch's first step.

  A program of its own, not a ``lax.cond`` in the train step: XLA's CPU runtime
  does not order collectives inside control flow against the step's other
  collectives, and devices that enter them in different orders wait forever.
  """
  def epoch_step(state: TrainState):
    return state.replace(method_state=start_epoch(ctx, state.method_state, state.params))
  return epoch_step


def make_encode_step(method: Method, ctx: Context):
  """Features of the method's backbone for evaluation (kNN, probes), BN in inference."""
  backbone = method.backbone(ctx.config)

  def encode_step(state: TrainState, images):
    pixels = augment.preprocess_eval(images, ctx.config.aug)
    return backbone.apply(method.backbone_variables(state.params, state.model_state),
                          pixels, train=False)
  return encode_step


# ----------------------------------------------------------------------------- state

def _initializer(method: Method, ctx: Context, tx, probe):
  """``(params_key, method_key) -> TrainState``: the random initial state."""
  size = ctx.config.data.image_size
  backbone = method.backbone(ctx.config)

  def initialize(params_key, method_key):
    # BatchNorm in inference mode: no statistics, so no mesh axis is looked for.
    variables = ctx.model.init(params_key, jnp.zeros((2, size, size, 3)), train=False)
    params = method.init_params(ctx, variables, jax.random.fold_in(method_key, 2))
    model_state = contract.model_state_of(variables)
    probe_state = {}
    if probe is not None:
      features = jax.eval_shape(
          lambda v: backbone.apply(v, jnp.zeros((1, size, size, 3)), train=False),
          method.backbone_variables(params, model_state))
      probe_state = online_probe.init(probe, jax.random.fold_in(method_key, 1),
                                      features.shape[-1])
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      model_state=model_state, opt_state=tx.init(params),
                      method_state=method.init_state(ctx, variables, method_key),
                      probe=probe_state)

  # RBG keys compile the hundreds of parameter initialisers several times faster
  # than threefry. The method's own parameters and state (classifier rows, queues,
  # banks) come from threefry, whose draws do not depend on how an array is split.
  keys = (jax.random.key(ctx.config.seed, impl='rbg'),
          jax.random.fold_in(jax.random.key(ctx.config.seed), 1))
  return initialize, keys


def state_specs(method: Method, ctx: Context, tx, probe=None) -> TrainState:
  """How the state lies on the mesh: replicated, except the method's sharded rows.

  Parameters the method splits by rows (``Method.param_specs``) have their
  optimizer state (momentum, Adam moments) split the same way.
  """
  initialize, keys = _initializer(method, ctx, tx, probe)
  abstract = jax.eval_shape(initialize, *keys)
  sharded = method.param_specs(ctx.config)
  split = {name: jax.tree.map(lambda _, s=name in sharded: s, value)
           for name, value in abstract.params.items()}
  opt_split = optax.tree_map_params(tx, lambda _, s: s, abstract.opt_state, split,
                                    transform_non_params=lambda _: False)
  spec = lambda s: P(AXIS) if s else P()
  return TrainState(step=P(), params=jax.tree.map(spec, split),
                    model_state=P(), opt_state=jax.tree.map(spec, opt_split),
                    method_state=method.state_specs(ctx.config), probe=P())


def init_state(method: Method, ctx: Context, tx, mesh,
               probe: online_probe.OnlineProbe | None = None) -> TrainState:
  """Random initial state on ``mesh``, a pure function of ``config.seed``."""
  shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec),
                           state_specs(method, ctx, tx, probe),
                           is_leaf=lambda x: isinstance(x, P))
  initialize, keys = _initializer(method, ctx, tx, probe)
  return jax.jit(initialize, out_shardings=shardings)(*keys)


def check_config(config: ml_collections.ConfigDict, method: Method) -> None:
  """The whole config, the method's section and every view's augmentation."""
  config_checks.raise_if(config_checks.method_section_problems(config, method))
  problems = list(method.check_config(config))
  if config.method != method.name:
    problems.append(f'config.method={config.method!r}, but the method given is '
                    f'{method.name!r}: set config.method={method.name!r}.')
  for view in method.views(config):
    problems += config_checks.check_augmentation(view.aug, view.field)
    if view.grid is not None:
      problems += config_checks.check_patch_grid(view.grid, view.size)
  config_checks.validate_pretraining(config, extra=problems)


# ----------------------------------------------------------------------------- main

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       method: Method | None = None) -> dict:
  """Pretrains, checkpoints, and ends with kNN / linear-probe figures.

  ``method`` defaults to ``METHODS[config.method]``. Restarting with the same
  ``workdir`` (a folder or a ``gs://`` URL) resumes from its newest readable
  checkpoint; a signal (SIGTERM, Ctrl-C) saves the step in flight and raises
  :class:`contrastive.loop.Preempted`. Returns the final evaluation figures (empty
  when evaluation is off).
  """
  method = method or get_method(config.method)
  check_config(config, method)
  # The workdir is checked and locked before any data is read.
  with loop.Preemption() as preemption, \
       workdir_lib.Workdir(workdir, config.keep_checkpoints) as run_dir:
    return _train(config, method, run_dir, preemption)


def _train(config, method: Method, run_dir: workdir_lib.Workdir,
           preemption: loop.Preemption) -> dict:
  evaluating = config.eval.enabled or config.eval.knn_every_epochs > 0
  layout = loop.layout(config.global_batch_size,
                       config.eval.batch_size if evaluating else None, 'config.eval.batch_size')

  # --- data
  if config.data.in_memory:
    train_data = in_memory.InMemoryTrainData(config.data, layout.mesh,
                                             layout.per_device_batch, config.seed)
    steps_per_epoch = train_data.steps_per_epoch
    num_examples, num_classes = train_data.num_examples, train_data.num_classes
    say(f'Training split: {train_data.num_examples} images in host memory'
        + (f' ({train_data.skipped} unreadable file(s) skipped).' if train_data.skipped
           else '.'))
  else:
    info = sources.split_info(config.data, 'train')
    num_examples, num_classes = info.num_examples, info.num_classes
    steps_per_epoch = sources.steps_per_epoch(config.data, num_examples,
                                              config.global_batch_size)
  num_steps = loop.total_steps(config.num_epochs, steps_per_epoch)
  run = RunInfo(num_examples=num_examples, num_devices=layout.mesh.devices.size,
                total_steps=num_steps)
  config_checks.raise_if(method.check_run(config, run))
  ctx = Context(model=method.build_model(config), config=config, run=run, axis_name=AXIS)

  # --- state
  opt = loop.optimizer(config.optim, config.global_batch_size, steps_per_epoch, num_steps)
  probe = (online_probe.create(num_classes, config.eval.online_probe_learning_rate)
           if config.eval.online_probe and num_classes else None)
  state = init_state(method, ctx, opt.tx, layout.mesh, probe)
  specs = state_specs(method, ctx, opt.tx, probe)
  train_step = parallel.per_replica(
      make_train_step(method, ctx, opt.tx, opt.schedule, probe), layout.mesh,
      in_specs=(specs, P(AXIS)), out_specs=(specs, P()), donate_argnums=(0,))
  if evaluating:
    encode_step = parallel.per_replica(make_encode_step(method, ctx), layout.mesh,
                                       in_specs=(specs, P(AXIS)), out_specs=P(AXIS))
    splits = monitor_lib.eval_splits(
        config, layout, train_data.process_block() if config.data.in_memory else None)

  state, start_step, saved_run = run_dir.resume(state, workdir_lib.config_record(config))
  write = method.init_from_data(config)
  if write is not None and start_step == 0:
    say('Initialising from one pass over the training split ...')
    state = initialise_from_data(
        state, make_prior_step(ctx, write), specs, layout,
        data_pass(config, layout, train_data if config.data.in_memory else None),
        config.data.image_size)
  if config.data.in_memory:
    batches = train_data.batches(start_step)
  else:
    from contrastive.data import pipeline  # pylint: disable=g-import-not-at-top
    batches = pipeline.train_iterator(
        config.data, method.views(config), layout.local_batch, seed=config.seed,
        shard_index=jax.process_index(), shard_count=jax.process_count(),
        start_position=loop.input_position(saved_run, start_step, layout.local_batch))

  # --- loop
  knn_every = (loop.total_steps(config.eval.knn_every_epochs, steps_per_epoch)
               if config.eval.knn_every_epochs > 0 else 0)

  def monitor_at(done, state):
    if knn_every and (done % knn_every == 0 or done == num_steps):
      return monitor_lib.monitor(state, encode_step, probe, config, splits)
    return {}

  start_epoch = method.start_epoch(config)
  epoch_step = None if start_epoch is None else parallel.per_replica(
      make_epoch_step(ctx, start_epoch), layout.mesh, in_specs=(specs,),
      out_specs=specs, donate_argnums=(0,))

  say(f'Training steps {start_step} -> {num_steps} ({steps_per_epoch} per epoch), '
      f'peak learning rate {opt.peak_lr:.4g}.')
  state = loop.train(run_dir, state, train_step, batches, layout.mesh,
                     start_step=start_step, num_steps=num_steps,
                     steps_per_epoch=steps_per_epoch,
                     global_batch=config.global_batch_size,
                     log_every=config.log_every_steps,
                     checkpoint_every=config.checkpoint_every_steps,
                     preemption=preemption, skip_nonfinite=config.skip_nonfinite_steps,
                     monitor=monitor_at, epoch_start=epoch_step,
                     prefetch=config.data.prefetch)

  # --- evaluation
  if not config.eval.enabled:
    return {}
  encoders = {'trained': state}
  if config.eval.compare_random_init:
    encoders['random_init'] = init_state(method, ctx, opt.tx, layout.mesh, probe)
  results = monitor_lib.evaluate(encoders, encode_step, config, splits, probe)
  run_dir.write_results('eval.json', num_steps, results, {
      f'{name}/{metric}': value for name, figures in results.items()
      for metric, value in figures.items()})
  say(monitor_lib.format_results(results, config))
  return results


# ----------------------------------------------------------------------------- data pass

def data_pass(config, layout: loop.Layout, train_data=None):
  """This process's batches of one pass over the training split, in its order:
  ``{'image', 'label', 'mask', 'index'}``, evaluation preprocessing (in memory:
  ``train_data``'s block, centre-cropped)."""
  if train_data is None:
    from contrastive.data import pipeline  # pylint: disable=g-import-not-at-top
    return pipeline.eval_iterator(config.data, 'train', layout.local_batch,
                                  jax.process_index(), jax.process_count())
  block = train_data.process_block()
  images = eval_data.centre_crop(block.images, float(config.data.eval_crop_fraction))
  return eval_data.padded_batches(images, block.labels, layout.local_batch,
                                  train_data.process_indices())


def fill_padding(batch: dict) -> dict:
  """The padding rows of a short batch replaced by copies of its real images
  (still masked out), so that BatchNorm's batch statistics see only real images."""
  real = np.flatnonzero(batch['mask'])
  missing = np.flatnonzero(~batch['mask'])
  if not len(real) or not len(missing):
    return batch
  image = batch['image'].copy()
  image[missing] = image[real[np.arange(len(missing)) % len(real)]]
  return {**batch, 'image': image}


def initialise_from_data(state, prior_step, specs, layout: loop.Layout, batches,
                         image_size: int):
  """``state`` after the method's per-replica ``prior_step`` saw every batch."""
  step = parallel.per_replica(prior_step, layout.mesh, in_specs=(specs, P(AXIS)),
                              out_specs=specs, donate_argnums=(0,))
  blank = padding.pad_batch(np.zeros((0, image_size, image_size, 3), np.uint8),
                            np.zeros(0, np.int32), layout.local_batch, np.zeros(0, np.int32))
  for batch in eval_data.lockstep(batches, blank):
    state = step(state, parallel.host_to_global(fill_padding(batch), layout.mesh))
    # One batch at a time, so that input batches do not pile up on the devices.
    jax.block_until_ready(state)
  return state

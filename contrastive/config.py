"""The config schemas, every field a run reads with its default, and their validation.

Experiment files in ``configs/`` start from :func:`base_config` (pretraining) or
:func:`downstream_config` (linear evaluation, fine-tuning) and change what their
recipe needs, so every run has every field and the command line can only override
fields that exist. :func:`validate_pretraining` and :func:`validate_downstream`
then check the values, all of them at once, before any data is read or any function
compiled: one ``ValueError`` lists every problem, one per line, each as
``config.<path>=<value>; <what is allowed>``.
"""

import ml_collections
from ml_collections import config_dict

from contrastive.data import augment

DOWNSTREAM_MODES = ('linear', 'finetune')


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.method = 'simclr'                 # see contrastive.methods.METHODS
  config.global_batch_size = 256           # summed over all devices and processes
  config.num_epochs = 100.0
  config.log_every_steps = 50
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 2
  config.skip_nonfinite_steps = 0          # N > 0: skip such updates, stop after N in a row

  config.simclr = ml_collections.ConfigDict()
  config.simclr.temperature = 0.1
  # SimCLR v2's memory: an EMA copy of the network whose projections of past
  # batches are queued and added to the in-batch negatives. 0: no queue (SimCLR v1).
  config.simclr.queue_size = 0
  config.simclr.momentum = 0.999           # that copy's EMA momentum
  config.simclr.momentum_schedule = 'constant'

  config.moco = ml_collections.ConfigDict()
  config.moco.queue_size = 65536           # K keys, split across devices; multiple of the batch
  config.moco.momentum = 0.999             # key encoder EMA
  config.moco.momentum_schedule = 'constant'  # or 'cosine' (from momentum towards 1)
  config.moco.temperature = 0.07
  config.moco.key_bn = 'shuffle'           # key encoder BN: 'shuffle', 'global' or 'local'
  config.moco.symmetric = False            # both views as queries (sum of both losses)
  # key_bn='shuffle': the global key batch is cut into this many groups, each
  # normalised with its own statistics (MoCo's split BN on one device); 0: one
  # group per device. A fixed number makes the keys independent of the device count.
  config.moco.bn_groups = 0

  config.membank = ml_collections.ConfigDict()
  config.membank.num_negatives = 4096      # bank rows drawn per step; 0: the whole bank
  config.membank.momentum = 0.5            # bank row <- m * row + (1 - m) * new embedding
  config.membank.temperature = 0.07

  config.instance_cls = ml_collections.ConfigDict()
  config.instance_cls.temperature = 0.2    # cosine logits / T (normalize=True)
  config.instance_cls.normalize = True     # L2-normalised rows and features
  config.instance_cls.contrastive_prior = True  # rows <- the random network's features
  config.instance_cls.smoothing = 0.0      # alpha: target 1 - alpha on i, alpha / K on its K
  config.instance_cls.smoothing_neighbours = 5  # K most similar rows, found once an epoch
  config.instance_cls.neighbour_chunk = 1024    # rows scored at a time by that search

  config.byol = ml_collections.ConfigDict()
  config.byol.momentum = 0.996             # target EMA, rising to 1 on the cosine schedule
  config.byol.momentum_schedule = 'cosine'

  config.moco_v3 = ml_collections.ConfigDict()
  config.moco_v3.temperature = 1.0         # 1.0 for ResNets; the loss is scaled by 2T
  config.moco_v3.momentum = 0.99           # key encoder EMA, rising to 1 (cosine)
  config.moco_v3.momentum_schedule = 'cosine'

  config.cmc = ml_collections.ConfigDict()
  config.cmc.temperature = 0.07            # both directions' (CMC: 0.07 ImageNet, 0.1 STL-10)
  config.cmc.negatives = 'membank'         # 'membank' (one bank per view) or 'queue' (MoCo-style)
  config.cmc.num_negatives = 4096          # memory bank rows drawn per step; 0: the whole bank
  config.cmc.bank_momentum = 0.5           # bank row <- m * row + (1 - m) * new embedding
  config.cmc.queue_size = 16384            # 'queue': keys per view, multiple of the batch
  config.cmc.momentum = 0.999              # 'queue': the key encoders' EMA momentum

  config.model = ml_collections.ConfigDict()
  config.model.name = 'resnet50'           # resnet10/18/34/50/101/152
  config.model.width = 1.0                 # channel multiplier
  config.model.stem = 'imagenet'           # 'imagenet' (7x7/2 + max-pool) or 'cifar' (3x3/1)
  config.model.bn = 'global'               # 'global': cross-replica statistics; 'local'
  config.model.bn_momentum = 0.9
  # Compute dtype of convolutions and dense layers: 'bfloat16', 'float32', or
  # 'auto' (bfloat16 on GPU and TPU, float32 on CPU). Parameters, optimizer state,
  # BN statistics and the loss are float32 in every case.
  config.model.precision = 'auto'
  # ResNet stages (1-4) whose activations are recomputed in the backward pass
  # instead of kept: less memory, about a third more compute for those stages.
  config.model.remat_stages = ()

  config.head = ml_collections.ConfigDict()
  config.head.num_layers = 2               # 1 linear, 2 SimCLR v1, 3 SimCLR v2
  config.head.hidden_dim = 0               # 0: the encoder's feature width
  config.head.out_dim = 128
  config.head.use_bn = True
  config.head.output_bn = True             # with use_bn: BN (no centring) after the last layer

  # The predictor MLP on the online side (BYOL, MoCo v3): projection -> prediction
  # of the same size, head.out_dim.
  config.predictor = ml_collections.ConfigDict()
  config.predictor.num_layers = 2
  config.predictor.hidden_dim = 4096
  config.predictor.output_bn = False

  config.data = ml_collections.ConfigDict()
  config.data.source = 'tfds'              # 'tfds', 'folder' or 'digits'
  config.data.name = 'imagenet2012'        # TFDS builder
  config.data.data_dir = ml_collections.config_dict.placeholder(str)
  config.data.path = ''                    # image folder root
  config.data.eval_path = ''               # folder: a separate evaluation folder (e.g. val/)
  config.data.train_split = 'train'
  config.data.eval_split = 'validation'
  config.data.holdout_per_class = 0        # folder/digits: images per class kept for eval
  config.data.image_size = 224
  config.data.eval_crop_fraction = 0.875   # 256 -> 224 centre crop; 1.0 = none
  config.data.in_memory = False            # True: whole split in host RAM, crops on device
  # Batches assembled on the host and sent to the devices ahead of the step that
  # takes them (a background thread); 0: each one when the step asks for it.
  config.data.prefetch = 2

  config.aug = augment.simclr_augment_config(strength=1.0, blur_prob=0.5)
  # The second view's augmentation, for methods whose two views differ (BYOL,
  # MoCo v3: blur and solarize); the others use config.aug for every view.
  config.aug2 = augment.simclr_augment_config(strength=1.0, blur_prob=0.5)

  config.optim = ml_collections.ConfigDict()
  config.optim.name = 'lars'               # 'lars', 'sgd' or 'adamw'
  config.optim.base_lr = 0.3
  config.optim.lr_scaling = 'linear'       # 'linear' (x B/256), 'sqrt' (x sqrt B), 'none'
  config.optim.warmup_epochs = 10.0
  config.optim.schedule = 'cosine'         # 'cosine' or 'steps' (x decay_factor at decay_epochs)
  config.optim.decay_epochs = ()
  config.optim.decay_factor = 0.1
  config.optim.weight_decay = 1e-6
  config.optim.momentum = 0.9
  config.optim.nesterov = False
  config.optim.trust_coefficient = 1e-3

  config.eval = ml_collections.ConfigDict()
  config.eval.enabled = True               # kNN + linear probe at the end of training
  config.eval.compare_random_init = True   # also report the same net with random weights
  config.eval.batch_size = 512
  config.eval.knn_k = 200
  config.eval.knn_temperature = 0.1
  config.eval.probe_epochs = 100
  config.eval.probe_learning_rate = 1e-2
  config.eval.knn_every_epochs = 0.0       # kNN monitor during training; 0: off
  config.eval.online_probe = True          # linear probe on the step's features (labelled data)
  config.eval.online_probe_learning_rate = 1e-3
  return config


def downstream_config() -> ml_collections.ConfigDict:
  """Every field of a downstream run, with its default."""
  config = ml_collections.ConfigDict()
  config.pretrained = ''                   # workdir of the pretraining run (required)
  config.pretrained_step = config_dict.placeholder(int)  # None: its latest checkpoint
  config.mode = 'linear'                   # 'linear' or 'finetune'
  # Hidden layers of the pretrained projection head kept under the classifier,
  # frozen or trained with the encoder: 0 the encoder's features; 1 SimCLR v2's
  # fine-tuning from the head's first layer (Dense -> BN -> ReLU).
  config.head_layers = 0
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
  pretraining_data = base_config().data
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


def negatives_study_config() -> ml_collections.ConfigDict:
  """Every field of a negatives study (``contrastive.studies.negatives``)."""
  config = ml_collections.ConfigDict()
  config.base = base_config()              # what every run shares
  config.temperature = 0.1                 # every method's softmax temperature
  config.batch_size = 128                  # memory bank and MoCo
  config.simclr_batch_sizes = (32, 128, 512)        # 2B - 2 negatives each
  config.membank_negatives = (256, 1024, 4096)
  config.moco_queue_sizes = (256, 1024, 4096)
  # Instance classification, all N - 1 other images as negatives: one run per
  # (contrastive prior, label smoothing alpha) pair.
  config.instance_cls_variants = ((False, 0.0), (True, 0.0), (False, 0.2), (True, 0.2))
  return config


# ----------------------------------------------------------------------------- validation
#
# Each ``*_problems`` function returns the problems it finds as strings, ``[]`` when
# the values are fine, so a caller can add its own (a method checks its section) and
# raise them all at once with ``raise_if``. The lists of valid names are imported
# from the modules that define them, inside the functions: importing this module
# stays cheap, and it never imports TensorFlow.

HEAD_LAYERS = (1, 2, 3)                    # linear, SimCLR v1 MLP, SimCLR v2 MLP

# A number's condition, by how the message writes it.
_CONDITIONS = {
    '> 0': lambda v: v > 0,
    '>= 0': lambda v: v >= 0,
    '>= 1': lambda v: v >= 1,
    'in [0, 1]': lambda v: 0 <= v <= 1,
    'in [0, 1)': lambda v: 0 <= v < 1,
    'in (0, 1]': lambda v: 0 < v <= 1,
    'in [0, 0.5]': lambda v: 0 <= v <= 0.5,
}
# Augmentation fields (any view may have a subset of them): name -> condition.
_AUG_NUMBERS = {
    'flip_prob': 'in [0, 1]', 'color_jitter_prob': 'in [0, 1]',
    'grayscale_prob': 'in [0, 1]', 'blur_prob': 'in [0, 1]', 'solarize_prob': 'in [0, 1]',
    'brightness': '>= 0', 'contrast': '>= 0', 'saturation': '>= 0', 'hue': 'in [0, 0.5]',
}
_AUG_PAIRS = {                             # name -> (rule as written, test of (lo, hi))
    'crop_area': ('0 < lo <= hi <= 1', lambda lo, hi: 0 < lo <= hi <= 1),
    'crop_aspect': ('0 < lo <= hi', lambda lo, hi: 0 < lo <= hi),
    'blur_sigma': ('0 < lo <= hi', lambda lo, hi: 0 < lo <= hi),
}
_RUN_FIELDS = (('global_batch_size', '> 0'), ('num_epochs', '>= 0'),
               ('log_every_steps', '>= 1'), ('checkpoint_every_steps', '>= 1'),
               ('keep_checkpoints', '>= 1'))
_PRETRAINING_FIELDS = (('skip_nonfinite_steps', '>= 0'),)
_DATA_FIELDS = (('image_size', '>= 1'), ('eval_crop_fraction', 'in (0, 1]'),
                ('holdout_per_class', '>= 0'), ('prefetch', '>= 0'))


def _show(path: str, value) -> str:
  return f'config.{path}={value!r}'


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _get(config, path: str):
  for key in path.split('.'):
    config = config[key]
  return config


def _one_of(value, valid) -> bool:
  return any(value == v and type(value) is type(v) for v in valid)  # True is not 1


def _fields(config, table, prefix: str = '', unset_ok: bool = False) -> list[str]:
  """Checks ``(path, rule)`` rows of ``config`` (named ``config.<prefix><path>``): a
  rule is a condition of ``_CONDITIONS`` or a tuple of the valid values.
  ``unset_ok``: a None value is inherited from elsewhere, not checked here."""
  problems = []
  for path, rule in table:
    value = _get(config, path)
    if value is None and unset_ok:
      continue
    if isinstance(rule, str):
      if not (_is_number(value) and _CONDITIONS[rule](value)):
        problems.append(f'{_show(prefix + path, value)}; must be {rule}')
    elif not _one_of(value, rule):
      problems.append(f'{_show(prefix + path, value)}; valid: {", ".join(map(str, rule))}')
  return problems


def _optim_problems(config) -> list[str]:
  from contrastive import optim  # pylint: disable=import-outside-toplevel
  problems = _fields(config, (
      ('optim.name', optim.OPTIMIZERS), ('optim.base_lr', '>= 0'),
      ('optim.lr_scaling', optim.LR_SCALINGS), ('optim.warmup_epochs', '>= 0'),
      ('optim.schedule', optim.SCHEDULES), ('optim.decay_factor', '> 0'),
      ('optim.weight_decay', '>= 0'), ('optim.momentum', 'in [0, 1)')))
  epochs = config.optim.decay_epochs
  if not (isinstance(epochs, (tuple, list)) and all(map(_is_number, epochs))
          and all(e >= 0 for e in epochs) and list(epochs) == sorted(epochs)):
    problems.append(f'{_show("optim.decay_epochs", epochs)}; must be epochs >= 0 in '
                    'ascending order, e.g. (60.0, 80.0)')
  return problems


def check_augmentation(aug, field: str = 'aug') -> list[str]:
  """The problems of one augmentation section, ``config.<field>``.

  Only the fields the section has are checked, so it serves a pretraining view
  (:func:`contrastive.data.augment.simclr_augment_config`) as well as the
  downstream crop-and-flip section.
  """
  problems = _fields(aug, [(name, rule) for name, rule in _AUG_NUMBERS.items()
                           if name in aug], prefix=f'{field}.')
  for name, (rule, test) in _AUG_PAIRS.items():
    if name in aug:
      value = aug[name]
      if not (isinstance(value, (tuple, list)) and len(value) == 2
              and all(map(_is_number, value)) and test(*value)):
        problems.append(f'{_show(f"{field}.{name}", value)}; must be a pair {rule}')
  if 'mean' in aug or 'std' in aug:
    mean, std = aug.get('mean'), aug.get('std')
    if (mean is None) != (std is None):
      unset, other = ('mean', 'std') if mean is None else ('std', 'mean')
      problems.append(f'{_show(f"{field}.{unset}", None)}; set together with '
                      f'{_show(f"{field}.{other}", aug.get(other))} (3 values each) '
                      'or leave both None')
    elif mean is not None:
      for name, value, rule in (('mean', mean, ''), ('std', std, ' > 0')):
        if not (isinstance(value, (tuple, list)) and len(value) == 3
                and all(map(_is_number, value))
                and (name == 'mean' or all(v > 0 for v in value))):
          problems.append(f'{_show(f"{field}.{name}", value)}; must be 3 numbers{rule} '
                          '(R, G, B), or None with no normalisation')
  return problems


def _data_problems(data, unset_ok: bool, evaluation: str) -> list[str]:
  """The data section: ranges, the source, and what that source needs.
  ``evaluation``: why an eval split is needed ('' when it is not)."""
  from contrastive.data import sources  # pylint: disable=import-outside-toplevel
  problems = _fields(data, (('source', sources.SOURCES),) + _DATA_FIELDS, 'data.', unset_ok)

  def known(*names):                       # checked only once set (pretraining: always)
    return not unset_ok or all(data[name] is not None for name in names)

  source, holdout, eval_path = data.source, data.holdout_per_class, data.eval_path
  if known('source', 'path') and source == 'folder' and not data.path:
    problems.append(f"{_show('data.path', data.path)}; data.source='folder' needs the "
                    'image folder')
  if known('source', 'in_memory') and source == 'digits' and not data.in_memory:
    problems.append(f"{_show('data.in_memory', data.in_memory)}; data.source='digits' "
                    'is in-memory only: set data.in_memory=True')
  if known('source', 'eval_path') and eval_path and source != 'folder':
    problems.append(f"{_show('data.eval_path', eval_path)}; only data.source='folder' "
                    f'reads it, not data.source={source!r}')
  has_holdout = _is_number(holdout) and holdout > 0
  if known('holdout_per_class', 'eval_path') and eval_path and has_holdout:
    problems.append(f"{_show('data.eval_path', eval_path)}; not together with "
                    f'data.holdout_per_class={holdout}: the eval images are either a '
                    'separate folder or held out of the training ones')
  if (evaluation and known('source', 'holdout_per_class', 'eval_path')
      and source in ('folder', 'digits') and not has_holdout and not eval_path):
    way = ' or data.eval_path' if source == 'folder' else ''
    problems.append(f"{_show('data.holdout_per_class', holdout)}; {evaluation} needs an "
                    f'eval split, which data.source={source!r} has only with '
                    f'data.holdout_per_class > 0{way}')
  return problems


def pretraining_problems(config) -> list[str]:
  """Every problem of a pretraining config (:func:`base_config`) outside the
  methods' own sections (``simclr``, ``moco``, ``membank``: their methods'
  ``check_config`` reads those)."""
  from contrastive import models  # pylint: disable=import-outside-toplevel
  from contrastive.models import resnet  # pylint: disable=import-outside-toplevel
  problems = _fields(config, _RUN_FIELDS + _PRETRAINING_FIELDS + (
      ('model.name', tuple(resnet.ARCHITECTURES)), ('model.width', '> 0'),
      ('model.stem', resnet.STEMS), ('model.bn', models.BN_MODES),
      ('model.bn_momentum', 'in [0, 1)'), ('model.precision', models.PRECISIONS),
      ('head.num_layers', HEAD_LAYERS), ('head.hidden_dim', '>= 0'),
      ('head.out_dim', '>= 1'), ('head.use_bn', (True, False)),
      ('head.output_bn', (True, False))))
  problems += _remat_problems(config.model)
  evaluation = ''
  if config.eval.enabled:
    evaluation = 'config.eval.enabled=True'
  elif _is_number(config.eval.knn_every_epochs) and config.eval.knn_every_epochs > 0:
    evaluation = f'config.eval.knn_every_epochs={config.eval.knn_every_epochs!r}'
  problems += _data_problems(config.data, unset_ok=False, evaluation=evaluation)
  problems += check_augmentation(config.aug, 'aug')
  problems += _optim_problems(config)
  problems += _fields(config, (
      ('eval.batch_size', '> 0'), ('eval.knn_k', '>= 1'),
      ('eval.knn_temperature', '> 0'), ('eval.knn_every_epochs', '>= 0')))
  return problems


def _remat_problems(model) -> list[str]:
  stages = model.remat_stages
  if not (isinstance(stages, (tuple, list)) and all(_one_of(s, (1, 2, 3, 4)) for s in stages)
          and len(set(stages)) == len(stages)):
    return [f'{_show("model.remat_stages", stages)}; must be distinct ResNet stage '
            'numbers from 1 to 4, e.g. (2, 3), or () for none']
  return []


def predictor_problems(config) -> list[str]:
  """The ``predictor`` section, for the methods that have one (BYOL, MoCo v3)."""
  return _fields(config, (('predictor.num_layers', HEAD_LAYERS),
                          ('predictor.hidden_dim', '>= 1'),
                          ('predictor.output_bn', (True, False))))


def downstream_problems(config) -> list[str]:
  """Every problem of a downstream config (:func:`downstream_config`). Data fields
  left None (the pretraining run's) are not checked, nor is ``head_layers`` against
  the run's head: :mod:`contrastive.downstream` does that once it has read the run."""
  problems = []
  if not config.pretrained:
    problems.append(f"{_show('pretrained', config.pretrained)}; must be the workdir of "
                    'a pretraining run')
  problems += _fields(config, (('mode', DOWNSTREAM_MODES),
                               ('head_layers', tuple(range(max(HEAD_LAYERS)))),
                               ('label_fraction', 'in (0, 1]')) + _RUN_FIELDS +
                      (('eval_batch_size', '> 0'),))
  problems += _data_problems(config.data, unset_ok=True,
                             evaluation='the downstream evaluation')
  problems += check_augmentation(config.aug, 'aug')
  problems += _optim_problems(config)
  return problems


def raise_if(problems) -> None:
  """Raises one ValueError listing ``problems``, one a line; nothing if empty.
  A problem found twice (a section two checks read) is listed once."""
  problems = list(dict.fromkeys(problems))
  if len(problems) == 1:
    raise ValueError(problems[0])
  if problems:
    raise ValueError(f'{len(problems)} problems in the config:\n' +
                     '\n'.join(f'  {problem}' for problem in problems))


def validate_pretraining(config, extra=()) -> None:
  """Raises one ValueError with every problem of a pretraining config, then the
  caller's ``extra`` problems (strings, e.g. a method's section)."""
  raise_if(pretraining_problems(config) + list(extra))


def validate_downstream(config, extra=()) -> None:
  """Raises one ValueError with every problem of a downstream config, then ``extra``."""
  raise_if(downstream_problems(config) + list(extra))

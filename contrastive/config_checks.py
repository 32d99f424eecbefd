"""Validation of configs: every problem at once, before any data is read.

:func:`validate_pretraining` and :func:`validate_downstream` check the values of a
:func:`contrastive.config.base_config` or :func:`~contrastive.config.downstream_config`
config, all of them at once, before any data is read or any function compiled:
one ``ValueError`` lists every problem, one per line, each as
``config.<path>=<value>; <what is allowed>``. A method checks its own section
(:attr:`contrastive.methods.Method.check_config`) with the same helpers.
"""

DOWNSTREAM_MODES = ('linear', 'finetune')

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
    'channel_drop_prob': 'in [0, 1]',
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
                ('holdout_per_class', '>= 0'), ('prefetch', '>= 0'),
                ('max_image_pixels', '>= 1'))


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
  betas = config.optim.get('adam_betas', (0.9, 0.999))
  if not (isinstance(betas, (tuple, list)) and len(betas) == 2
          and all(_is_number(b) and 0 <= b < 1 for b in betas)):
    problems.append(f'{_show("optim.adam_betas", betas)}; must be a pair in [0, 1)')
  epochs = config.optim.decay_epochs
  if not (isinstance(epochs, (tuple, list)) and all(map(_is_number, epochs))
          and all(e >= 0 for e in epochs) and list(epochs) == sorted(epochs)):
    problems.append(f'{_show("optim.decay_epochs", epochs)}; must be epochs >= 0 in '
                    'ascending order, e.g. (60.0, 80.0)')
  return problems


def check_augmentation(aug, field: str = 'aug') -> list[str]:
  """The problems of one augmentation section, ``config.<field>``.

  Only the fields the section has are checked, so it serves a pretraining view
  (:func:`contrastive.data.augment_config.simclr_augment_config`) as well as the
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


def check_patch_grid(grid, view_size: int) -> list[str]:
  """The problems of a view's grid of patches (:class:`contrastive.methods.PatchGrid`):
  its augmentation section, and patches that fit the view at least twice per side."""
  problems = check_augmentation(grid.aug, grid.field)
  if grid.aug.get('mean') is not None:
    problems.append(f'{_show(f"{grid.field}.mean", grid.aug.mean)}; the patches are '
                    "normalised with their view's mean and std: leave it None")
  section = grid.field.rpartition('.')[0]
  size, stride = f'{section}.patch_size', f'{section}.patch_stride'
  if not (isinstance(grid.size, int) and 1 <= grid.size <= view_size):
    problems.append(f'{_show(size, grid.size)}; must be an integer in [1, {view_size}] '
                    f'(the view is {view_size} px)')
  elif not (isinstance(grid.stride, int) and grid.stride >= 1):
    problems.append(f'{_show(stride, grid.stride)}; must be an integer >= 1')
  elif (view_size - grid.size) % grid.stride or view_size - grid.size < grid.stride:
    problems.append(f'{_show(stride, grid.stride)} with {size}={grid.size} does not tile '
                    f'the {view_size} px view into at least 2 x 2 patches: '
                    f'{view_size} - {grid.size} must be a positive multiple of the stride')
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
  problems = _fields(config, _RUN_FIELDS + _PRETRAINING_FIELDS + (
      ('head.num_layers', HEAD_LAYERS), ('head.hidden_dim', '>= 0'),
      ('head.out_dim', '>= 1'), ('head.use_bn', (True, False)),
      ('head.output_bn', (True, False))))
  problems += _model_problems(config)
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


def _model_problems(config) -> list[str]:
  """The encoder's name, the fields every encoder reads, and those of its family
  (a ResNet's; a ViT's in ``model.vit``)."""
  from contrastive import models  # pylint: disable=import-outside-toplevel
  from contrastive.models import resnet  # pylint: disable=import-outside-toplevel
  from contrastive.models import vit  # pylint: disable=import-outside-toplevel
  problems = _fields(config, (
      ('model.name', models.ENCODERS), ('model.bn', models.BN_MODES),
      ('model.bn_momentum', 'in [0, 1)'), ('model.precision', models.PRECISIONS)))
  if config.model.name in resnet.ARCHITECTURES:
    problems += _fields(config, (
        ('model.width', '> 0'), ('model.stem', resnet.STEMS), ('model.norm', resnet.NORMS),
        ('model.group_norm_groups', '>= 1')))
    stages = config.model.remat_stages
    if not (isinstance(stages, (tuple, list)) and len(set(stages)) == len(stages)
            and all(_one_of(s, (1, 2, 3, 4)) for s in stages)):
      problems.append(f'{_show("model.remat_stages", stages)}; must be distinct ResNet '
                      'stage numbers from 1 to 4, e.g. (2, 3), or () for none')
  elif config.model.name in vit.VARIANTS:
    problems += _fields(config, (
        ('model.vit.patch_size', '>= 1'), ('model.vit.pooling', vit.POOLINGS),
        ('model.vit.position_embedding', vit.POSITION_EMBEDDINGS),
        ('model.vit.frozen_patch_projection', (True, False)),
        ('model.vit.drop_path_rate', 'in [0, 1)'), ('model.vit.remat', (True, False)),
        ('model.vit.hidden_dim', '>= 0'), ('model.vit.depth', '>= 0'),
        ('model.vit.num_heads', '>= 0'), ('model.vit.mlp_dim', '>= 0')))
    problems += _vit_size_problems(config)
  return problems


def _vit_size_problems(config) -> list[str]:
  """The ViT's width splits over its heads, and the images over its patches."""
  from contrastive.models import vit  # pylint: disable=import-outside-toplevel
  section, size = config.model.vit, config.data.image_size
  width, _, heads, _ = vit.VARIANTS[config.model.name]
  width, heads = section.hidden_dim or width, section.num_heads or heads
  problems = []
  if _is_number(width) and _is_number(heads) and heads > 0 and width % heads:
    problems.append(f'{_show("model.vit.hidden_dim", width)}; must be a multiple of '
                    f'model.vit.num_heads={heads}')
  patch = section.patch_size
  if _is_number(size) and _is_number(patch) and patch > 0 and size % patch:
    problems.append(f'{_show("data.image_size", size)}; a ViT cuts it into '
                    f'model.vit.patch_size={patch} patches: it must be a multiple of it')
  return problems


def method_section_problems(config, method) -> list[str]:
  """The method's section (``config.<method.name>``) is there and holds only the
  fields of the method's :attr:`~contrastive.methods.Method.default_config`."""
  defaults = method.default_config()
  if defaults is None:
    return []
  if method.name not in config:
    return [f'config.{method.name} is missing: the {method.name!r} method reads its '
            'section there. Start from contrastive.config.base_config(), or for a '
            'method of your own call contrastive.config.add_method_section(config, '
            'METHOD).']
  unknown = sorted(set(config[method.name]) - set(defaults))
  return [f'config.{method.name}.{name} is not a field of the {method.name!r} method; '
          f'valid: {", ".join(defaults)}' for name in unknown]


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

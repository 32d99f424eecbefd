"""A ResNet backbone under torchvision's and detectron2's parameter names.

The arrays are the backbone's own (convolutions transposed to OIHW); only the
names and layouts are the other frameworks'. A CMC encoder (two ResNets, of the L
and ab channels of Lab) gives both, each under its view's prefix; a backbone with
head layers on top (SimCLR v2's fine-tuning) adds them under ``head.``.
"""

import numpy as np

from contrastive import models
from contrastive.models import lab_split
from contrastive.models import resnet
from contrastive.reader import Pretrained


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
  check_resnet(pretrained.encoder)
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


def check_resnet(encoder) -> None:
  """Only a BatchNorm ResNet has torchvision's and detectron2's layout."""
  if not isinstance(encoder, resnet.ResNet):
    raise ValueError(f'The backbone is a {type(encoder).__name__}, not a ResNet: '
                     'torchvision and detectron2 names exist for ResNets only; export '
                     'it in the flax format (a ViT: the timm format).')
  norm = getattr(encoder, 'norm', 'batch')
  if norm != 'batch':
    raise ValueError(f"model.norm={norm!r}: torchvision's and detectron2's ResNets have "
                     'BatchNorm layers, which this backbone has not; export it in the '
                     'flax format.')


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

"""A ViT encoder under timm's ``VisionTransformer`` parameter names.

The arrays are the encoder's own, float32, in torch's layouts (the patch
projection OIHW, dense kernels ``[out, in]``); only the names are timm's. Loading
them into timm needs nothing of this package, and this module needs no torch.
"""

import re
from typing import Any, Mapping

import numpy as np

# (hidden_dim, depth, num_heads, mlp_dim): timm's registered name prefix.
_STANDARD = {
    (192, 12, 3, 768): 'vit_tiny',
    (384, 12, 6, 1536): 'vit_small',
    (768, 12, 12, 3072): 'vit_base',
}
# The (prefix, patch size) pairs timm registers at 224 px (it has no ViT-Ti/8).
_REGISTERED = {('vit_tiny', 16), ('vit_small', 16), ('vit_base', 16),
               ('vit_small', 8), ('vit_base', 8)}

# A block's submodule: its timm name and its Flax leaves.
_BLOCK_PARTS = {('norm1',): ('norm1', ('scale', 'bias')), ('norm2',): ('norm2', ('scale', 'bias')),
                ('attn', 'qkv'): ('attn.qkv', ('kernel', 'bias')),
                ('attn', 'proj'): ('attn.proj', ('kernel', 'bias')),
                ('mlp', 'fc1'): ('mlp.fc1', ('kernel', 'bias')),
                ('mlp', 'fc2'): ('mlp.fc2', ('kernel', 'bias'))}
# Flax leaf name -> torch's; the torch layout from Flax's.
_LEAVES = {'scale': ('weight', lambda a: a), 'bias': ('bias', lambda a: a),
           'kernel': ('weight', lambda a: a.T)}


def timm_state_dict(encoder: Any, variables: Mapping, image_size: int) -> dict[str, np.ndarray]:
  """``encoder``'s variables (``{'params': ...}``, and ``'frozen'`` with a frozen
  patch projection) under timm's names, for ``image_size`` px square images.

  ``pooling='token'`` loads with ``strict=True`` into::

      net = timm.create_model('vit_small_patch16_224', num_classes=0)
      net.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)

  and ``pooling='gap'`` into ``timm.create_model('vit_small_patch16_224',
  num_classes=0, global_pool='avg', class_token=False)``. :func:`timm_model_name`
  gives the name (ViT-Ti/16, S/16, S/8, B/16 and B/8 at 224 px); any size loads
  into ``timm.models.vision_transformer.VisionTransformer(**timm_kwargs(encoder,
  image_size))``. Either computes the encoder's features: the network, its
  LayerNorm epsilon and exact GELU are timm's defaults.

  ``position_embedding='sincos'`` writes the fixed table into ``pos_embed``, and
  a frozen patch projection becomes ``patch_embed.proj``: timm holds both as
  ordinary parameters, to be frozen there (``requires_grad_(False)``) to keep
  them fixed in fine-tuning.

  Raises ValueError for a variable that has no timm name, a missing one, or a
  learned position embedding not sized for ``image_size``.
  """
  patch_collection = 'frozen' if encoder.frozen_patch_projection else 'params'
  state, unmapped = {}, []
  for path, value in _flatten(variables):
    name = _timm_name(path, encoder.depth, patch_collection)
    if name is None:
      unmapped.append('/'.join(path))
      continue
    value = np.asarray(value, np.float32)
    if name == 'patch_embed.proj.weight':
      state[name] = value.transpose(3, 2, 0, 1)              # HWIO -> OIHW
    else:
      state[name] = _LEAVES[path[-1]][1](value) if path[-1] in _LEAVES else value
  if unmapped:
    raise ValueError(f'variables with no timm name: {", ".join(unmapped)}')

  grid = image_size // encoder.patch_size
  if encoder.position_embedding == 'sincos':
    state['pos_embed'] = encoder.position_table((grid, grid))[None]
  tokens = grid * grid + (1 if encoder.pooling == 'token' else 0)
  if 'pos_embed' in state and state['pos_embed'].shape[1] != tokens:
    raise ValueError(f'the position embedding has {state["pos_embed"].shape[1]} tokens; '
                     f'{image_size} px images in {encoder.patch_size} px patches need {tokens}')
  missing = sorted(set(_expected_names(encoder)) - set(state))
  if missing:
    raise ValueError(f'variables missing for timm names: {", ".join(missing)}')
  # Writable copies: torch.from_numpy warns on the read-only views of JAX arrays.
  return {name: np.array(value, np.float32, order='C') for name, value in state.items()}


def timm_model_name(encoder: Any, image_size: int) -> str | None:
  """The ``timm.create_model`` name of ``encoder``'s network (with
  ``global_pool='avg', class_token=False`` for ``pooling='gap'``), or None when
  timm registers none for its size, patch size or image size."""
  prefix = _STANDARD.get((encoder.hidden_dim, encoder.depth, encoder.num_heads, encoder.mlp_dim))
  if image_size != 224 or (prefix, encoder.patch_size) not in _REGISTERED:
    return None
  return f'{prefix}_patch{encoder.patch_size}_224'


def timm_kwargs(encoder: Any, image_size: int) -> dict[str, Any]:
  """Keyword arguments of timm's ``VisionTransformer`` (or of ``create_model``
  after the name) that build ``encoder``'s network for ``image_size`` px images,
  without a classifier."""
  mlp_ratio = encoder.mlp_dim / encoder.hidden_dim
  if int(encoder.hidden_dim * mlp_ratio) != encoder.mlp_dim:
    raise ValueError(f'timm sizes the MLP as int(embed_dim * mlp_ratio), which gives no '
                     f'mlp_dim={encoder.mlp_dim} from hidden_dim={encoder.hidden_dim}')
  token = encoder.pooling == 'token'
  return dict(img_size=image_size, patch_size=encoder.patch_size,
              embed_dim=encoder.hidden_dim, depth=encoder.depth,
              num_heads=encoder.num_heads, mlp_ratio=mlp_ratio,
              global_pool='token' if token else 'avg', class_token=token, num_classes=0)


def _flatten(tree: Mapping, prefix: tuple[str, ...] = ()):
  for key, value in tree.items():
    if isinstance(value, Mapping):
      yield from _flatten(value, prefix + (str(key),))
    else:
      yield prefix + (str(key),), value


def _timm_name(path: tuple[str, ...], depth: int, patch_collection: str) -> str | None:
  collection, *names = path
  if names[:1] == ['patch_embed']:
    if collection == patch_collection and names[1:] in (['kernel'], ['bias']):
      return f'patch_embed.proj.{_LEAVES[names[1]][0]}'
    return None
  if collection != 'params' or not names:
    return None
  if names in (['cls_token'], ['pos_embed']):
    return names[0]
  if len(names) == 2 and names[0] in ('norm', 'fc_norm') and names[1] in ('scale', 'bias'):
    return f'{names[0]}.{_LEAVES[names[1]][0]}'
  block = re.fullmatch(r'block(\d+)', names[0])
  part, leaves = _BLOCK_PARTS.get(tuple(names[1:-1]), (None, ()))
  if not (block and int(block[1]) < depth and names[-1] in leaves):
    return None
  return f'blocks.{int(block[1])}.{part}.{_LEAVES[names[-1]][0]}'


def _expected_names(encoder: Any) -> list[str]:
  token = encoder.pooling == 'token'
  names = ['patch_embed.proj.weight', 'patch_embed.proj.bias', 'pos_embed']
  names += ['cls_token'] if token else []
  for i in range(encoder.depth):
    names += [f'blocks.{i}.{part}.{leaf}' for part, _ in _BLOCK_PARTS.values()
              for leaf in ('weight', 'bias')]
  names += [f'{"norm" if token else "fc_norm"}.{leaf}' for leaf in ('weight', 'bias')]
  return names

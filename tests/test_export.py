"""Loading a run's encoder and exporting it to Flax, torchvision and detectron2."""

import functools
import importlib.util
import json
import logging
import os
import pickle
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors
from jax.sharding import NamedSharding, PartitionSpec as P
from safetensors import numpy as safetensors_numpy

from contrastive import config as config_lib
from contrastive import export
from contrastive import reader
from contrastive.data import augment
from contrastive.formats import torch_resnet
from contrastive.methods import TrainState, get_method
from contrastive.models import resnet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Torch and XLA sum convolutions in different orders: float32 rounding, relative
# to the largest feature (random deep nets reach features in the hundreds).
TORCH_RELATIVE_TOLERANCE = 1e-5


@pytest.fixture(name='run_dir')
def fixture_run_dir(pretrained_workdir):
  """The shared tiny pretraining run (SimCLR, ResNet-10, CIFAR stem, 8 devices)."""
  return pretrained_workdir


def _images(count: int, size: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), np.uint8)


def _write_workdir(workdir: str, config, variables, step: int, method_state) -> None:
  """A workdir as the trainer writes it; ``method_state`` split over all devices."""
  os.makedirs(workdir)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort())
  mesh = jax.make_mesh((jax.device_count(),), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,))
  state = TrainState(
      step=jnp.asarray(step, jnp.int32),
      params={'encoder': variables['params'], 'head': {'kernel': jnp.ones((4, 4))}},
      model_state={'batch_stats': {'encoder': variables['batch_stats']}},
      opt_state={'momentum': jnp.zeros((4, 4))},
      method_state=jax.device_put(method_state, NamedSharding(mesh, P("data"))), probe={})
  manager = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), 'checkpoints'))
  manager.save(step, args=ocp.args.StandardSave(state))
  manager.wait_until_finished()
  manager.close()


@functools.cache
def _random_pretrained(name: str, stem: str = 'imagenet', width: float = 1.0,
                       stage_sizes: tuple[int, ...] | None = None) -> reader.Pretrained:
  """A ResNet with random weights and BatchNorm that is far from the identity.

  Shapes come from ``eval_shape`` and values from numpy: compiling Flax's
  initialisers for a ResNet-50 would take half a minute on a CPU.
  """
  default_sizes, block = resnet.ARCHITECTURES[name]
  encoder = resnet.ResNet(stage_sizes or default_sizes, block, width=width, stem=stem)
  shapes = jax.eval_shape(functools.partial(encoder.init, train=False),
                          jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  rng = np.random.default_rng(0)

  def value(path, leaf):
    kind = path[-1].key
    if kind == 'kernel':   # He initialisation
      std = np.sqrt(2 / np.prod(leaf.shape[:-1]))
      return rng.normal(0, std, leaf.shape).astype(np.float32)
    if kind in ('scale', 'var'):
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    return rng.normal(0, 0.2, leaf.shape).astype(np.float32)   # bias, mean

  config = config_lib.base_config()
  config.model.name, config.model.stem, config.model.width = name, stem, width
  return reader.Pretrained(config=config, encoder=encoder,
                           variables=jax.tree_util.tree_map_with_path(value, shapes),
                           step=7, method=get_method('simclr'))


# ----------------------------------------------------------------------------- loader

def test_load_pretrained_gives_the_trained_encoder(run_dir, caplog):
  with caplog.at_level(logging.INFO):
    pretrained = reader.load_pretrained(run_dir)
  # Reading asks for what it reads: Orbax has nothing to warn about ('Item "run"
  # ... could not be restored', 'Given directory is read only').
  assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert pretrained.step == 8
  assert pretrained.config.model.name == 'resnet10'
  assert pretrained.config.aug.crop_area == (0.3, 1.0)     # JSON lists back to tuples
  assert pretrained.encoder.bn_axis_name is None
  assert set(pretrained.variables) == {'params', 'batch_stats'}
  assert 'stem_conv' in pretrained.variables['params']
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(pretrained.variables))

  # The whole saved state, through the method's own backbone.
  manager = ocp.CheckpointManager(os.path.join(run_dir, 'checkpoints'),
                                  item_handlers=ocp.PyTreeCheckpointHandler())
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                              manager.item_metadata(8).tree)
  state = manager.restore(8, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  manager.close()
  method = get_method(pretrained.config.method)
  backbone = method.backbone(pretrained.config)
  images = _images(20, 16)
  expected = jax.jit(functools.partial(backbone.apply, train=False))(
      method.backbone_variables(state['params'], state['model_state']),
      augment.preprocess_eval(images, pretrained.config.aug))
  features = reader.encode(pretrained, images, batch_size=16)   # two batches
  assert features.shape == (20, pretrained.encoder.num_features)
  np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(reader.encode(pretrained, images / 255.0, batch_size=16),
                             expected, rtol=1e-5, atol=1e-5)


def test_load_pretrained_errors_name_the_path(run_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match='config.json'):
    reader.load_pretrained(str(tmp_path))
  with open(os.path.join(run_dir, 'config.json')) as f:
    (tmp_path / 'config.json').write_text(f.read())
  with pytest.raises(FileNotFoundError, match=str(tmp_path / 'checkpoints')):
    reader.load_pretrained(str(tmp_path))
  with pytest.raises(FileNotFoundError, match='no checkpoint of step 3; it has steps 8'):
    reader.load_pretrained(run_dir, step=3)
  downstream = tmp_path / 'downstream'
  downstream.mkdir()
  (downstream / 'config.json').write_text('{"mode": "linear", "pretrained": "/x"}')
  with pytest.raises(ValueError, match='not the config of a pretraining run'):
    reader.load_pretrained(str(downstream))


def test_one_device_process_reads_checkpoints_of_eight(run_dir, tmp_path):
  """A 1-device process exports the 8-device run through the command line, and
  skips a method state split over the 8 devices; the Flax file then loads
  without Orbax or the trainer."""
  pretrained = reader.load_pretrained(run_dir)
  sharded = str(tmp_path / 'sharded')
  _write_workdir(sharded, pretrained.config, pretrained.variables, step=3,
                 method_state={'queue': jnp.arange(64 * 16.0).reshape(64, 16)})
  standalone = str(tmp_path / 'standalone.msgpack')
  export.export_flax(run_dir, standalone)
  out = str(tmp_path / 'encoder.msgpack')
  script = f"""
import sys
import jax
from contrastive import export
from contrastive import reader
assert jax.device_count() == 1
module, variables = export.load_flax_encoder({standalone!r})
heavy = [m for m in ('orbax.checkpoint', 'contrastive.train', 'contrastive.config',
                     'tensorflow', 'torch') if m in sys.modules]
assert not heavy, f'load_flax_encoder imported {{heavy}}'
assert reader.load_pretrained({sharded!r}).step == 3
sys.argv = ['export', '--workdir={run_dir}', '--format=flax', '--out={out}']
export.main()
"""
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=1',
         'JAX_PLATFORMS': 'cpu'}
  result = subprocess.run([sys.executable, '-c', script], cwd=REPO, env=env,
                          capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr[-3000:]

  module, variables = export.load_flax_encoder(out)
  jax.tree.map(np.testing.assert_array_equal, variables, pretrained.variables)
  images = _images(8, 16, seed=1)
  np.testing.assert_allclose(
      module.apply(variables, images / np.float32(255), train=False),
      reader.encode(pretrained, images, batch_size=8), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------ torchvision

# Torch runs in its own interpreter: importing it into a process that already
# loaded TensorFlow and XLA can crash (both bundle their own native libraries).
_TORCH_SCRIPT = """
import sys
import numpy as np
import torch
import torchvision
from safetensors.numpy import load_file

def build(kind):
  if kind == 'resnet18':
    return torchvision.models.resnet18()
  if kind == 'resnet18_cifar':
    net = torchvision.models.resnet18()
    net.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = torch.nn.Identity()
    return net
  return torchvision.models.resnet.ResNet(torchvision.models.resnet.Bottleneck, [2, 1, 1, 1])

folder = sys.argv[1]
for kind in sys.argv[2:]:
  net = build(kind)
  net.fc = torch.nn.Identity()
  state = load_file(f'{folder}/{kind}.safetensors')
  net.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
  net.eval()
  images = np.load(f'{folder}/{kind}_images.npy')
  with torch.no_grad():
    features = net(torch.from_numpy(np.transpose(images, (0, 3, 1, 2)))).numpy()
  np.save(f'{folder}/{kind}_torch.npy', features)
"""

# kind -> (the Flax twin, image size)
_TORCH_NETS = {
    'resnet18': (lambda: _random_pretrained('resnet18'), 64),
    # The CIFAR stem: torchvision's conv1 replaced by a 3x3/1 convolution, no max-pool.
    'resnet18_cifar': (lambda: _random_pretrained('resnet18', stem='cifar'), 32),
    # ResNet-50's block, in a shorter net: compiling all of ResNet-50 is slow.
    'bottleneck': (lambda: _random_pretrained('resnet50', stage_sizes=(2, 1, 1, 1)), 32),
}


@pytest.fixture(scope='module')
def torch_features(tmp_path_factory):
  """Features of torchvision's own ResNets loaded with the exported state dicts."""
  if importlib.util.find_spec('torchvision') is None:
    pytest.skip('torchvision is not installed (pip install -e .[test])')
  folder = tmp_path_factory.mktemp('torch')
  images = {}
  for kind, (pretrained, size) in _TORCH_NETS.items():
    safetensors_numpy.save_file(torch_resnet.torchvision_state_dict(pretrained()),
                                str(folder / f'{kind}.safetensors'))
    images[kind] = np.random.default_rng(2).normal(size=(4, size, size, 3)).astype(
        np.float32)
    np.save(folder / f'{kind}_images.npy', images[kind])
  result = subprocess.run([sys.executable, '-c', _TORCH_SCRIPT, str(folder), *_TORCH_NETS],
                          capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return {kind: (images[kind], np.load(folder / f'{kind}_torch.npy')) for kind in _TORCH_NETS}


@pytest.mark.parametrize('kind', list(_TORCH_NETS))
def test_torchvision_resnet_gives_the_same_features(torch_features, kind):
  """torchvision's ResNet loads the exported dict strictly and gives the Flax features."""
  pretrained = _TORCH_NETS[kind][0]()
  images, features = torch_features[kind]
  expected = np.asarray(jax.jit(functools.partial(pretrained.encoder.apply, train=False))(
      pretrained.variables, images))
  error = np.abs(features - expected).max() / np.abs(expected).max()
  print(f'{kind}: max |torch - flax| / max |flax| = {error:.2e}')
  assert error < TORCH_RELATIVE_TOLERANCE


def test_exported_files(tmp_path):
  """safetensors and detectron2 .pkl files from a workdir hold the state dicts."""
  pretrained = _random_pretrained('resnet18', width=0.25)
  workdir = str(tmp_path / 'run')
  _write_workdir(workdir, pretrained.config, pretrained.variables, step=7,
                 method_state={})
  loaded = reader.load_pretrained(workdir)

  path = str(tmp_path / 'resnet18.safetensors')
  export.export_torchvision(workdir, path)
  saved = safetensors_numpy.load_file(path)
  expected = torch_resnet.torchvision_state_dict(loaded)
  assert saved.keys() == expected.keys()
  jax.tree.map(np.testing.assert_array_equal, saved, expected)
  assert saved['bn1.num_batches_tracked'] == 7
  with safetensors.safe_open(path, 'np') as f:
    assert json.loads(f.metadata()['model'])['name'] == 'resnet18'

  path = str(tmp_path / 'resnet18.pkl')
  export.export_detectron2(workdir, path)
  with open(path, 'rb') as f:
    data = f.read()
  assert b'numpy._core' not in data        # readable by NumPy 1.x too
  checkpoint = pickle.loads(data)
  assert checkpoint['matching_heuristics'] is True     # see tests/test_detectron2.py
  assert '__author__' in checkpoint
  expected = torch_resnet.detectron2_state_dict(loaded)
  assert checkpoint['model'].keys() == expected.keys()
  jax.tree.map(np.testing.assert_array_equal, checkpoint['model'], expected)
  assert checkpoint['model']['stem.conv1.weight'].flags.writeable

  loaded.config.model.stem = 'cifar'
  with pytest.raises(ValueError, match='stem'):
    torch_resnet.detectron2_state_dict(loaded)


# ------------------------------------------------------------------------- detectron2

def test_detectron2_names_of_resnet50():
  """Every detectron2 name, listed from ResNet-50's structure, holds the array of
  its torchvision name, and no other name exists."""
  pretrained = _random_pretrained('resnet50')
  norm = ('weight', 'bias', 'running_mean', 'running_var')
  names = {'stem.conv1.weight': 'conv1.weight'}   # detectron2 -> torchvision
  names.update({f'stem.conv1.norm.{k}': f'bn1.{k}' for k in norm})
  for stage, blocks in enumerate((3, 4, 6, 3), start=1):
    for i in range(blocks):
      layers = [(f'conv{k}', f'conv{k}', f'bn{k}') for k in (1, 2, 3)]
      if i == 0:
        layers.append(('shortcut', 'downsample.0', 'downsample.1'))
      for conv, torch_conv, torch_bn in layers:
        block, torch_block = f'res{stage + 1}.{i}', f'layer{stage}.{i}'
        names[f'{block}.{conv}.weight'] = f'{torch_block}.{torch_conv}.weight'
        names.update({f'{block}.{conv}.norm.{k}': f'{torch_block}.{torch_bn}.{k}'
                      for k in norm})
  detectron2 = torch_resnet.detectron2_state_dict(pretrained)
  torchvision = torch_resnet.torchvision_state_dict(pretrained)
  assert set(detectron2) == set(names)
  assert {k for k in torchvision if not k.endswith('num_batches_tracked')} == set(
      names.values())
  for name, torch_name in names.items():
    np.testing.assert_array_equal(detectron2[name], torchvision[torch_name])
  assert detectron2['res5.0.shortcut.weight'].shape == (2048, 1024, 1, 1)

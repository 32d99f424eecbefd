"""The detectron2 export through detectron2 itself: its own checkpointer loads the
file into the detection models a user builds from detectron2's configs (Faster
R-CNN R50-C4 on VOC, Faster R-CNN and Mask R-CNN R50-FPN on COCO), every backbone
tensor by value, and the loaded ResNet gives the exported network's features.

detectron2 is not on the package registries: CI installs the wheel in
``../shared/wheels`` (``.ci/run``), where this test must run (``CI=true``);
elsewhere it is skipped when detectron2 is missing (install it as its docs say).
"""

import functools
import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from contrastive import export
from tests import test_export

# Torch and detectron2 in their own interpreter: beside TensorFlow and XLA they
# can crash (each bundles native libraries).
_DETECTRON2_SCRIPT = """
import json, pickle, sys
import numpy as np
import torch
from detectron2 import model_zoo
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model

path, images = sys.argv[1], np.load(sys.argv[2])
with open(path, 'rb') as f:
  exported = pickle.load(f)['model']
report = {}
for config_file in sys.argv[3:]:
  cfg = get_cfg()
  cfg.merge_from_file(model_zoo.get_config_file(config_file))
  cfg.MODEL.DEVICE = 'cpu'
  cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
  cfg.INPUT.FORMAT = 'RGB'
  model = build_model(cfg)
  DetectionCheckpointer(model).load(path)
  state = model.state_dict()
  # Where detectron2's models keep the bare ResNet's tensors.
  places = ('backbone.', 'backbone.bottom_up.', 'roi_heads.')
  loaded = sum(any(place + name in state and torch.equal(
      state[place + name].float(), torch.from_numpy(np.asarray(value)).float())
                   for place in places) for name, value in exported.items())
  backbone = [k for k in state if k.startswith(('backbone.bottom_up.', 'roi_heads.res5.'))
              or (k.startswith('backbone.') and 'fpn' not in k and 'bottom_up' not in k)]
  report[config_file] = {'loaded': loaded, 'exported': len(exported),
                         'backbone_tensors': len(backbone)}
  if hasattr(model.backbone, 'bottom_up'):
    model.eval()
    with torch.no_grad():
      res5 = model.backbone.bottom_up(torch.from_numpy(np.transpose(images, (0, 3, 1, 2))))
    report[config_file]['features'] = res5['res5'].mean(dim=(2, 3)).numpy().tolist()
print(json.dumps(report))
"""

CONFIGS = ('PascalVOC-Detection/faster_rcnn_R_50_C4.yaml',
           'COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml',
           'COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml')


def require_detectron2():
  """Fails in CI without detectron2, skips elsewhere."""
  if importlib.util.find_spec('detectron2') is None:
    if os.environ.get('CI') == 'true':
      pytest.fail('detectron2 is not installed, and CI must test the detectron2 path '
                  'with it: pip install ../shared/wheels/detectron2-0.6-*.whl')
    pytest.skip('detectron2 is not installed (see its installation docs)')


@pytest.fixture(scope='module', name='detectron2_report')
def fixture_detectron2_report(tmp_path_factory):
  require_detectron2()
  pretrained = test_export._random_pretrained('resnet50')   # pylint: disable=protected-access
  folder = tmp_path_factory.mktemp('detectron2')
  path = folder / 'r50.pkl'
  path.write_bytes(export.detectron2_checkpoint(pretrained, 'a random ResNet-50'))
  images = np.random.default_rng(3).normal(size=(2, 64, 64, 3)).astype(np.float32)
  np.save(folder / 'images.npy', images)
  result = subprocess.run([sys.executable, '-c', _DETECTRON2_SCRIPT, str(path),
                           str(folder / 'images.npy'), *CONFIGS],
                          capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  ours = np.asarray(jax.jit(functools.partial(pretrained.encoder.apply, train=False))(
      pretrained.variables, images))
  return report, ours


@pytest.mark.parametrize('config_file', CONFIGS)
def test_detectron2s_checkpointer_loads_every_backbone_tensor(detectron2_report,
                                                             config_file):
  report = detectron2_report[0][config_file]
  # ResNet-50's 265 tensors (53 convolutions, 53 norms of 4), all of them by value,
  # and they are all the ResNet tensors the model has.
  assert report['exported'] == 265
  assert report['loaded'] == report['exported'] == report['backbone_tensors']


@pytest.mark.parametrize('config_file', CONFIGS[1:])
def test_the_loaded_resnet_gives_the_exported_features(detectron2_report, config_file):
  report, ours = detectron2_report
  features = np.asarray(report[config_file]['features'], np.float32)
  # Torch and XLA sum the convolutions in different orders: float32 rounding,
  # relative to the largest feature of a random ResNet-50.
  error = np.abs(features - ours).max() / np.abs(ours).max()
  assert error < test_export.TORCH_RELATIVE_TOLERANCE, error

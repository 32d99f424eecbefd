"""The negatives study on CIFAR-10 images in a folder, sized for a CPU.

    python -m contrastive.studies.negatives --config=configs/negatives_study.py \
        --workdir=/tmp/negatives --config.base.data.path=/data/cifar10/train

SimCLR at batch 32/128/512 (62/254/1022 negatives), the memory bank and MoCo at
batch 128 with 256/1024/4096 negatives, the instance classifier at batch 128 (all
N - 1 other images) with and without the contrastive prior and label smoothing,
all with a ResNet-18 of width 0.125
(64-d features), the MoCo v2 CIFAR augmentation and MLP head, temperature 0.1,
SGD with cosine decay, 5 epochs, kNN (k=200) on 100 held-out images per class.
On a GPU, widen the budget: ``--config.base.model.width=1.0
--config.base.num_epochs=200``.
"""

from configs import moco_v2_cifar10
from contrastive.config import negatives_study_config


def get_config(arg=None):
  del arg
  base = moco_v2_cifar10.get_config()
  base.num_epochs = 5.0
  base.log_every_steps = 20
  base.checkpoint_every_steps = 500
  base.model.width = 0.125
  base.model.bn = 'global'
  base.moco.key_bn = 'shuffle'
  base.moco.bn_groups = 0                  # one group per device: one device, no shuffle
  base.data.source = 'folder'
  base.data.path = ''
  base.data.holdout_per_class = 100
  base.eval.compare_random_init = False
  base.eval.probe_epochs = 30

  config = negatives_study_config()
  config.base = base
  return config

"""MoCo v3 on CIFAR-10, ResNet-18 with the CIFAR stem (solo-learn's CIFAR recipe).

    python -m contrastive.main --config=configs/moco_v3_cifar10.py --workdir=/tmp/moco_v3_cifar10

Batch 256, LARS lr 0.3 x B/256 with trust coefficient 0.02, 10 warmup epochs then
cosine, weight decay 1e-6, 1000 epochs; T = 0.2; projector 4096 -> 256 ending in
BatchNorm, predictor 4096 -> 256; key momentum 0.99 rising to 1 (cosine);
BYOL's asymmetric views without blur (32 px). solo-learn reports 93.10% online
linear top-1 at 1000 epochs. The data comes from TFDS (``--config.data.data_dir``);
for a folder of CIFAR-10 images, one sub-folder per class, 500 per class held out:

    python -m contrastive.main --config=configs/moco_v3_cifar10.py --workdir=/tmp/run \
        --config.data.source=folder --config.data.path=/data/cifar10/train \
        --config.data.holdout_per_class=500
"""

from configs import byol_cifar10


def get_config(arg=None):
  del arg
  config = byol_cifar10.get_config()
  config.method = 'moco_v3'
  config.moco_v3.temperature = 0.2
  config.moco_v3.momentum = 0.99
  config.moco_v3.momentum_schedule = 'cosine'
  config.head.output_bn = True
  config.optim.base_lr = 0.3
  config.optim.weight_decay = 1e-6
  return config

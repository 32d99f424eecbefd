"""SimCLR v2 on CIFAR-10: ResNet-18 with the CIFAR stem, a 3-layer head and a queue.

    python -m contrastive.main --config=configs/simclr_v2_cifar10.py --workdir=/tmp/simclr_v2_cifar10

SimCLR's CIFAR-10 recipe (``configs/simclr_cifar10.py``: batch 512, LARS lr 1.0 x
B/256, temperature 0.5, colour strength 0.5, no blur, 1000 epochs) with SimCLR v2's
3-layer head and memory. SimCLR v2 publishes no CIFAR-10 memory settings: the
queue of 4096 keys (the last 4 steps, both views) and the EMA momentum 0.99 are
MoCo v2's CIFAR-10 values (``configs/moco_v2_cifar10.py``), not tuned here. For a
folder of CIFAR-10 images, one sub-folder per class, 500 per class held out:

    python -m contrastive.main --config=configs/simclr_v2_cifar10.py --workdir=/tmp/run \
        --config.data.source=folder --config.data.path=/data/cifar10/train \
        --config.data.holdout_per_class=500
"""

from configs import simclr_cifar10


def get_config(arg=None):
  config = simclr_cifar10.get_config(arg)
  config.head.num_layers = 3
  config.simclr.queue_size = 4096
  config.simclr.momentum = 0.99
  config.simclr.momentum_schedule = 'constant'
  return config

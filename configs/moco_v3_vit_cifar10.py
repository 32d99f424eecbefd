"""MoCo v3 on CIFAR-10 with a ViT-S of 4x4 patches on the 32 px images (8x8 tokens).

    python -m contrastive.main --config=configs/moco_v3_vit_cifar10.py \
        --workdir=/tmp/moco_v3_vit_cifar10

The ImageNet ViT recipe (``configs/moco_v3_vit_imagenet.py``: AdamW, weight decay
0.1, T = 0.2, momentum 0.99 rising to 1, sin-cos positions, the frozen random
patch projection, projector 3 layers and predictor 2 layers ending in BatchNorm)
on CIFAR-10 with MoCo v3's ViT-S (12 heads) at patch 4, batch 512, lr 1.5e-4 x
B/256, 1000 epochs with 40 warmup, and BYOL's CIFAR views (no blur; solarize 0 /
0.2). The patch size, batch, epochs and learning rate are this library's choice
for 32 px images, not a published recipe. The data comes from TFDS
(``--config.data.data_dir``); for a folder of CIFAR-10 images, one sub-folder
per class, 500 per class held out:

    python -m contrastive.main --config=configs/moco_v3_vit_cifar10.py --workdir=/tmp/run \
        --config.data.source=folder --config.data.path=/data/cifar10/train \
        --config.data.holdout_per_class=500
"""

from configs import moco_v3_cifar10
from configs import moco_v3_vit_imagenet


def get_config(arg=None):
  del arg
  config = moco_v3_cifar10.get_config()
  vit = moco_v3_vit_imagenet.get_config('small')
  config.model = vit.model
  config.model.vit.patch_size = 4
  config.head = vit.head
  config.predictor = vit.predictor
  config.moco_v3.temperature = 0.2
  config.global_batch_size = 512
  config.num_epochs = 1000.0
  config.optim = vit.optim
  return config

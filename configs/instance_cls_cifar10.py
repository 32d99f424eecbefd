"""Instance classification on CIFAR-10: one class per training image, ResNet-18.

    python -m contrastive.main --config=configs/instance_cls_cifar10.py \
        --workdir=/tmp/instance_cls_cifar10

The method of the one-million-way instance classifier (Liu et al., AAAI 2021) at
CIFAR scale: a 2-layer MLP head (512-512-128), a cosine classifier with one row
per training image split across the devices, temperature 0.2, the contrastive
prior (rows set to the random network's features before the first step) and
labels smoothed over each image's 5 most similar rows (alpha 0.2), found once an
epoch. Training follows MoCo's CIFAR-10 recipe (batch 512, SGD lr 0.06 x B/512,
cosine, weight decay 5e-4, 200 epochs, MoCo v2 augmentation without blur).
``get_config('plain')`` turns off both the prior and the smoothing (random rows,
one-hot targets), for comparison. For a folder of CIFAR-10 images, one
sub-folder per class, 500 per class held out:

    python -m contrastive.main --config=configs/instance_cls_cifar10.py --workdir=/tmp/run \
        --config.data.source=folder --config.data.path=/data/cifar10/train \
        --config.data.holdout_per_class=500
"""

from configs import moco_v2_cifar10

ARGS = ('plain',)


def get_config(arg=None):
  if arg not in (None, *ARGS):
    raise ValueError(f'configs/instance_cls_cifar10.py:{arg}; valid arguments: '
                     f'{", ".join(ARGS)}')
  config = moco_v2_cifar10.get_config()
  config.method = 'instance_cls'
  config.instance_cls.temperature = 0.2
  config.instance_cls.normalize = True
  config.instance_cls.contrastive_prior = arg != 'plain'
  config.instance_cls.smoothing = 0.0 if arg == 'plain' else 0.2
  config.instance_cls.smoothing_neighbours = 5
  config.model.bn = 'global'               # one branch: no key encoder to shuffle for
  config.head.use_bn = True
  return config

"""SimCLR v2 on ImageNet (Chen et al. 2020b): bigger ResNets, a 3-layer head, MoCo's memory.

    python -m contrastive.main --config=configs/simclr_v2_imagenet.py:r50_1x \
        --workdir=gs://bucket/simclr_v2_r50_1x --config.data.data_dir=gs://bucket/tfds \
        --distributed

The argument is the ResNet, depth x width: r50_1x (the default), r50_2x, r101_1x,
r101_2x, r152_1x, r152_2x, r152_3x, the networks of the paper's Table 1. Selective
kernels (SK) are not implemented, so the paper's SK models, its largest r152_3x
among them, cannot be reproduced here; the published linear top-1 without SK
(official README): 71.7 (r50_1x), 75.6 (r50_2x), 73.6 (r101_1x), 77.0 (r101_2x),
74.5 (r152_1x), 77.4 (r152_2x).

Recipe: 800 epochs at batch 4096 with global BatchNorm; LARS (momentum 0.9), lr
0.075 x sqrt(B) (4.8 at 4096) with cosine decay, weight decay 1e-4; temperature
0.1; a 3-layer head whose hidden layers have the encoder's width, 128-d output;
SimCLR's augmentation with blur; the memory: a queue of 65536 keys from an EMA
copy of the network with momentum 0.999. Sources: the learning rate and its
scaling, weight decay, temperature and batch are the official README's SimCLR v2
ImageNet command; the head is the official code's default; 800 epochs, the
64K memory and the 0.999 EMA are the paper's implementation details, which were
read here only through a secondary summary. Not confirmed: the warmup (10
epochs, the official code's default), and what the memory holds: the official
code has no memory, and the paper does not say; here both views' keys are
queued (8192 a step: the queue spans the last 8 steps).
"""

from configs import simclr_imagenet

# argument -> (model.name, model.width)
NETWORKS = {
    'r50_1x': ('resnet50', 1.0), 'r50_2x': ('resnet50', 2.0),
    'r101_1x': ('resnet101', 1.0), 'r101_2x': ('resnet101', 2.0),
    'r152_1x': ('resnet152', 1.0), 'r152_2x': ('resnet152', 2.0),
    'r152_3x': ('resnet152', 3.0),
}
ARGS = tuple(NETWORKS)


def get_config(arg=None):
  arg = 'r50_1x' if arg is None else arg
  if arg not in NETWORKS:
    raise ValueError(f'configs/simclr_v2_imagenet.py:{arg}; valid arguments: '
                     f'{", ".join(ARGS)}')
  config = simclr_imagenet.get_config('v2')    # batch 4096, T 0.1, LARS, 3-layer head
  config.model.name, config.model.width = NETWORKS[arg]
  config.num_epochs = 800.0
  config.simclr.queue_size = 65536
  config.simclr.momentum = 0.999
  config.simclr.momentum_schedule = 'constant'
  config.optim.base_lr = 0.075
  config.optim.lr_scaling = 'sqrt'
  config.optim.weight_decay = 1e-4
  return config

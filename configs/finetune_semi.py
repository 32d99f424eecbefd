"""Semi-supervised fine-tuning on 1% or 10% of the labels (SimCLR's setting).

    python -m contrastive.downstream --config=configs/finetune_semi.py:10 \
        --config.pretrained=/tmp/quickstart --workdir=/tmp/quickstart_finetune_10pct

The argument is the label percentage, 1 or 10 (10 when left out): a
class-balanced subset of the labelled training split, fixed by ``subset_seed``. The whole backbone and a new
linear classifier are trained, BatchNorm in training mode with cross-replica
statistics. Recipe after SimCLR v1 (appendix B.5): SGD with Nesterov momentum 0.9,
lr 0.05 x B/256, no warmup, no weight decay, cosine decay, 60 epochs on 1% / 30 on
10%, augmentation only a random resized crop and a flip.

In-memory datasets are subsampled here. For ImageNet (streamed) use SimCLR's own
subsets from TFDS instead, with all of their labels:

    python -m contrastive.downstream --config=configs/finetune_semi.py:1 \
        --config.pretrained=gs://bucket/simclr_imagenet --workdir=gs://bucket/semi_1pct \
        --config.data.name=imagenet2012_subset/1pct --config.label_fraction=1.0 \
        --config.global_batch_size=4096 --distributed
"""

from contrastive.config import downstream_config

_EPOCHS = {'1': 60.0, '10': 30.0}
ARGS = tuple(_EPOCHS)


def get_config(arg=None):
  arg = '10' if arg is None else arg
  if arg not in _EPOCHS:
    raise ValueError(f'get_config({arg!r}): the argument is the label percentage, 1 or '
                     '10, e.g. --config=configs/finetune_semi.py:10')
  config = downstream_config()
  config.mode = 'finetune'
  config.label_fraction = int(arg) / 100
  config.global_batch_size = 256
  config.num_epochs = _EPOCHS[arg]

  config.aug.crop_area = (0.08, 1.0)
  config.aug.flip_prob = 0.5

  config.optim.name = 'sgd'
  config.optim.base_lr = 0.05
  config.optim.lr_scaling = 'linear'
  config.optim.momentum = 0.9
  config.optim.nesterov = True
  config.optim.weight_decay = 0.0
  config.optim.schedule = 'cosine'
  return config

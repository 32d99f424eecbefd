"""SimCLR v2's semi-supervised fine-tuning from the first layer of the projection head.

    python -m contrastive.downstream --config=configs/finetune_simclr_v2.py:10 \
        --config.pretrained=/tmp/quickstart --workdir=/tmp/quickstart_v2_finetune_10pct

The argument is the label percentage, 1 or 10 (10 when left out), of a
class-balanced subset as in ``finetune_semi.py``. SimCLR v2 does not discard the
whole projection head: the encoder and the head's first hidden layer (Dense -> BN
-> ReLU, read from the pretraining checkpoint) are trained together with a new
linear classifier on top, BatchNorm in training mode with cross-replica
statistics. The pretraining run needs a head with a hidden layer (SimCLR v2's has
two: ``configs/simclr_v2_imagenet.py``).

Recipe after SimCLR v2: LARS with momentum 0.9, lr 0.005 x sqrt(B) (0.16 at batch
1024; 0.002 x sqrt(B) for ResNets wider than 1x, ``--config.optim.base_lr=0.002``),
no warmup, no weight decay, cosine decay, 60 epochs on 1% / 30 on 10%,
augmentation only a random resized crop and a flip. For ImageNet (streamed) use
the TFDS subsets with all of their labels:

    python -m contrastive.downstream --config=configs/finetune_simclr_v2.py:1 \
        --config.pretrained=gs://bucket/simclr_v2_imagenet --workdir=gs://bucket/v2_semi_1pct \
        --config.data.name=imagenet2012_subset/1pct --config.label_fraction=1.0 \
        --distributed
"""

from contrastive.config import downstream_config

_EPOCHS = {'1': 60.0, '10': 30.0}
ARGS = tuple(_EPOCHS)


def get_config(arg=None):
  arg = '10' if arg is None else arg
  if arg not in _EPOCHS:
    raise ValueError(f'get_config({arg!r}): the argument is the label percentage, 1 or '
                     '10, e.g. --config=configs/finetune_simclr_v2.py:10')
  config = downstream_config()
  config.mode = 'finetune'
  config.head_layers = 1
  config.label_fraction = int(arg) / 100
  config.global_batch_size = 1024
  config.num_epochs = _EPOCHS[arg]

  config.aug.crop_area = (0.08, 1.0)
  config.aug.flip_prob = 0.5

  config.optim.name = 'lars'
  config.optim.base_lr = 0.005
  config.optim.lr_scaling = 'sqrt'
  config.optim.momentum = 0.9
  config.optim.weight_decay = 0.0
  config.optim.warmup_epochs = 0.0
  config.optim.schedule = 'cosine'
  return config

"""Linear evaluation with SimCLR's protocol, on the encoder of a pretraining run.

    python -m contrastive.downstream --config=configs/linear_eval_simclr.py \
        --config.pretrained=/tmp/quickstart --workdir=/tmp/quickstart_linear_simclr

Frozen backbone (BatchNorm in inference mode), a linear classifier initialised
N(0, 0.01); SGD with Nesterov momentum 0.9, lr 0.1 x B/256, no weight decay,
cosine decay to 0 over 100 epochs (CIFAR; ``get_config('imagenet')``, i.e.
``--config=configs/linear_eval_simclr.py:imagenet``, gives ImageNet's 90 epochs at
SimCLR's batch 4096). Training images get a random resized crop and a flip;
evaluation images a centre crop. The data is the pretraining run's unless
``--config.data.*`` says otherwise.
"""

from contrastive.config import downstream_config

ARGS = ('imagenet',)


def get_config(arg=None):
  if arg not in (None, 'imagenet'):
    raise ValueError(f"get_config({arg!r}): the argument is 'imagenet' or nothing.")
  config = downstream_config()
  config.mode = 'linear'
  config.global_batch_size = 4096 if arg == 'imagenet' else 256
  config.num_epochs = 90.0 if arg == 'imagenet' else 100.0

  config.aug.crop_area = (0.08, 1.0)
  config.aug.flip_prob = 0.5

  config.optim.name = 'sgd'
  config.optim.base_lr = 0.1
  config.optim.lr_scaling = 'linear'
  config.optim.momentum = 0.9
  config.optim.nesterov = True
  config.optim.weight_decay = 0.0
  config.optim.schedule = 'cosine'
  return config

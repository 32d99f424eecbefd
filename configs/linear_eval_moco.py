"""Linear evaluation with MoCo's protocol, on the encoder of a pretraining run.

    python -m contrastive.downstream --config=configs/linear_eval_moco.py \
        --config.pretrained=/tmp/quickstart --workdir=/tmp/quickstart_linear_moco

Frozen backbone (BatchNorm in inference mode), a linear classifier initialised
N(0, 0.01); SGD with momentum 0.9, lr 30 at batch 256 (scaled linearly with the
batch), no weight decay, 100 epochs with the lr x0.1 at epochs 60 and 80. Training
images get a random resized crop and a flip; evaluation images a centre crop
(``data.eval_crop_fraction`` of the pretraining run unless overridden). The data
is the pretraining run's unless ``--config.data.*`` says otherwise; for datasets
where a mirror image changes the class (digits) add ``--config.aug.flip_prob=0``.
"""

from contrastive.config import downstream_config


def get_config(arg=None):
  del arg
  config = downstream_config()
  config.mode = 'linear'
  config.global_batch_size = 256
  config.num_epochs = 100.0

  config.aug.crop_area = (0.08, 1.0)
  config.aug.flip_prob = 0.5

  config.optim.name = 'sgd'
  config.optim.base_lr = 30.0
  config.optim.lr_scaling = 'linear'
  config.optim.momentum = 0.9
  config.optim.nesterov = False
  config.optim.weight_decay = 0.0
  config.optim.schedule = 'steps'
  config.optim.decay_epochs = (60.0, 80.0)
  config.optim.decay_factor = 0.1
  return config

"""Every method on the same CIFAR-10 budget, sized for a CPU.

    python -m contrastive.studies.methods --config=configs/methods_study.py \
        --workdir=/tmp/methods --config.budget.data_path=/tmp/data/cifar10_sub

SimCLR, MoCo v2, SimCLR v2 (memory queue), BYOL, MoCo v3, CMC, CPC v2 and AMDIM,
each from its
own CIFAR-10 file, on one budget: a ResNet-18 (CIFAR stem) of width 0.125, batch
128, 5 epochs with half an epoch of warmup, the kNN monitor (k=200) after every
epoch, 500 images per class held out, queues of at most 4096 keys. On a GPU,
widen it: ``--config.budget.width=1.0 --config.budget.num_epochs=200``.
"""

import ml_collections


def get_config(arg=None):
  del arg
  config = ml_collections.ConfigDict()
  config.runs = (('SimCLR', 'simclr_cifar10'), ('MoCo v2', 'moco_v2_cifar10'),
                 ('SimCLR v2 (memory queue)', 'simclr_v2_cifar10'),
                 ('BYOL', 'byol_cifar10'), ('MoCo v3', 'moco_v3_cifar10'),
                 ('CMC', 'cmc_cifar10'), ('CPC v2', 'cpc_cifar10'),
                 ('AMDIM', 'amdim_cifar10'))
  config.budget = ml_collections.ConfigDict()
  config.budget.data_path = ''             # a folder of images, one sub-folder per class
  config.budget.holdout_per_class = 500
  config.budget.width = 0.125
  config.budget.batch_size = 128
  config.budget.num_epochs = 5.0
  config.budget.warmup_epochs = 0.5
  config.budget.max_queue_size = 4096
  config.budget.probe_epochs = 30
  config.budget.log_every_steps = 20
  config.budget.checkpoint_every_steps = 500
  return config

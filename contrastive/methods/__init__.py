"""Contrastive methods, each one :class:`Method` value in its own module.

The contract (what a method provides, with defaults for what it does not need)
is in :mod:`contrastive.methods.contract`; the pieces several methods share are
:mod:`contrastive.methods.ema` (the EMA target network),
:mod:`contrastive.methods.queue` (the sharded queue of keys),
:mod:`contrastive.methods.bank` (the sharded memory bank) and
:mod:`contrastive.methods.rows` (tables split by rows). ``config.method`` chooses a
method from :data:`METHODS`; the trainer also accepts any ``Method`` directly,
so a method can live outside the library.
"""

from contrastive.methods import amdim
from contrastive.methods import byol
from contrastive.methods import cmc
from contrastive.methods import cpc
from contrastive.methods import instance_cls
from contrastive.methods import membank
from contrastive.methods import moco
from contrastive.methods import moco_v3
from contrastive.methods import simclr
from contrastive.methods.contract import (Batch, Context, LossOutput, Method, PatchGrid,
                                          RunInfo, TrainState, View)

METHODS = {method.name: method for method in (simclr.METHOD, moco.METHOD, membank.METHOD,
                                             instance_cls.METHOD, byol.METHOD,
                                             moco_v3.METHOD, cmc.METHOD, cpc.METHOD,
                                             amdim.METHOD)}


def get_method(name: str) -> Method:
  if name not in METHODS:
    raise ValueError(f'config.method={name!r} is unknown; valid: {", ".join(METHODS)}. '
                     'A method from outside the library is passed as method= to '
                     'train.train_and_evaluate, downstream.train_and_evaluate, '
                     'reader.load_pretrained and the export functions.')
  return METHODS[name]

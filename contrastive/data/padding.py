"""The padded batch of evaluation, shared by the in-memory and the streamed path.

Evaluation passes run every process through the same number of full batches, so
that all of them take part in every collective: a short batch is padded to the
batch size and its padding masked out. Both the in-memory batches
(``evaluation.padded_batches``) and the streaming pipeline's evaluation pass
(``pipeline.eval_iterator``) produce this one format, and ``evaluation``
dispatches between them, so the format lives below both. Numpy only.
"""

import numpy as np


def pad_batch(images, labels, batch_size: int, index=None) -> dict:
  """A possibly short batch padded to ``batch_size``: zero images, label -1,
  ``mask`` False on the padding, so every process runs full, equal batches
  (``index``: each image's position in the split, kept as ``index``)."""
  n = len(labels)
  pad = batch_size - n
  batch = {'image': np.pad(images, ((0, pad), (0, 0), (0, 0), (0, 0))),
           'label': np.pad(labels, (0, pad), constant_values=-1),
           'mask': np.arange(batch_size) < n}
  if index is not None:
    batch['index'] = np.pad(np.asarray(index, np.int32), (0, pad))
  return batch

"""TensorFlow, imported on first use with its GPUs hidden.

The tfds source and the streaming pipeline (for every source) need TensorFlow;
the digits and folder sources and everything that runs from host memory do not,
and accelerator hosts may not have it installed. So no module of this package
imports it at the top: they call :func:`import_tensorflow` inside the functions
that use it.
"""


def import_tensorflow():
  """Imports TensorFlow with GPUs hidden, so it never takes accelerator memory from JAX.

  Shared by the tfds source and the streaming pipeline (for every source).
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:
    # TensorFlow was already initialised by the caller; its device choice stands.
    pass
  return tf

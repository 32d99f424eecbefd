"""What an image file holds, as PIL reads it: the one rule for both input paths.

The in-memory folder source decodes every file here. The streaming pipeline
decodes JPEG, PNG and 24/32-bit BMP with TensorFlow, whose pixels for them are
these (``host_image_ops.decode``), and every other file here, so a file holds the
same pixels, or is skipped, on either path. A file with more pixels than
``data.max_image_pixels`` is skipped on both, named with its size and the field.

Nothing here imports TensorFlow.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# config.data.max_image_pixels's default (PIL's own limit), for configs saved before
# the field existed.
DEFAULT_MAX_PIXELS = 89_478_485

# PIL's own guard is process-wide and refuses images over twice its limit whatever
# data.max_image_pixels allows: the field is checked here instead.
Image.MAX_IMAGE_PIXELS = None

# PIL's modes of 16-bit greyscale PNGs, which its RGB conversion clips at 255.
_16_BIT_MODES = ('I', 'I;16', 'I;16B', 'I;16L', 'I;16N')


class TooLarge(ValueError):
  """An image with more pixels than ``data.max_image_pixels``."""


def max_pixels(data) -> int:
  """``data.max_image_pixels`` (its default where a saved config lacks it)."""
  return data.get('max_image_pixels') or DEFAULT_MAX_PIXELS


def too_large_note(name: str, width: int, height: int, limit: int) -> str:
  """How both paths name a file skipped for its size."""
  return (f'{name} ({width}x{height} = {width * height} pixels, more than '
          f'data.max_image_pixels={limit}: raise it to read the image)')


def read_rgb(file, limit: int | None, name: str,
             draft_size: int | None = None) -> Image.Image:
  """The image of ``file`` (a path or a binary file) in RGB.

  Raises ``TooLarge`` (naming the file ``name``) above ``limit`` pixels (None: any
  size) before decoding them, and PIL's errors for a file it cannot read.
  ``draft_size``: a JPEG may be decoded at a reduced scale that keeps both sides >=
  it (the in-memory source resizes it anyway).
  """
  with Image.open(file) as image:
    if limit is not None and image.width * image.height > limit:
      raise TooLarge(too_large_note(name, image.width, image.height, limit))
    if draft_size is not None:
      image.draft('RGB', (draft_size, draft_size))
    if image.mode in _16_BIT_MODES:
      # The high byte, as TensorFlow and PIL's 16-bit RGB reading keep it.
      image = Image.fromarray((np.asarray(image, np.uint32) >> 8).astype(np.uint8))
    return image.convert('RGB')


def decode_bytes(encoded: bytes, limit: int | None) -> np.ndarray:
  """uint8 [H, W, 3] of an encoded image, for the streaming pipeline; [0, 0, 3] for one
  that cannot be read or is too large (its exception would put a traceback per file
  in TensorFlow's log)."""
  try:
    return np.asarray(read_rgb(io.BytesIO(encoded), limit, 'the image'))
  except Exception:  # pylint: disable=broad-except
    return np.zeros((0, 0, 3), np.uint8)


def skip_note(path: str, limit: int) -> str:
  """``path``, with its size and the limit if that is why it was skipped."""
  try:
    with Image.open(path) as image:
      width, height = image.size
  except Exception:  # pylint: disable=broad-except
    return path     # PIL cannot read it either: unreadable, not too large.
  return too_large_note(path, width, height, limit) if width * height > limit else path

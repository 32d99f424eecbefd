"""The streaming pipeline's image ops, in TensorFlow: decoding, crops and resizes.

Each op works on one example inside a tf.data map of ``pipeline``: decoding an
image file to PIL's pixels (or only a JPEG's window), a training view's random
resized crop and flip (the host counterpart of ``augment.sample_crop_box``: the
same rule, so the same uniform draws give the same box), and evaluation's resize
and centre crop. They take the TensorFlow module as their first argument,
so this module never imports it: callers get it from ``tf_import``.
"""

import numpy as np

from contrastive.data import pil_images

# Random-resized-crop attempts before falling back to the whole image.
_CROP_ATTEMPTS = 10
# Uniform draws per view: areas and aspects of the attempts, top, left and the flip.
VIEW_DRAWS = 2 * _CROP_ATTEMPTS + 3
# Columns decoded either side of a JPEG crop window and cut off (decode_jpeg_window):
# more than one chroma sample, 2 pixels at 4:2:0 and 4:2:2 (where 2 is measured to be
# exact and 1 not) and 4 at 4:1:1 (which Pillow cannot write, so untested).
_WINDOW_MARGIN = 8
# libjpeg's accurate integer DCT, PIL's (TensorFlow's default, the fast one, differs
# from it by a few levels).
_JPEG_DCT = 'INTEGER_ACCURATE'
# A BMP's header up to its size, bit depth and compression.
_BMP_HEADER = 34
_PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def decode(tf, encoded, max_pixels=None):
  """An image file -> uint8 [H, W, 3]: the pixels ``pil_images.read_rgb`` gives.

  TensorFlow decodes JPEG (with libjpeg's accurate integer DCT, as PIL does), PNG
  and uncompressed 24/32-bit BMP, once their header's size is within ``max_pixels``
  (None: any size). Every other file (GIF, WebP, palette BMP, ...), where its pixels
  differ from PIL's or it reads none, PIL decodes. A file that cannot be read, or
  that has more than ``max_pixels`` pixels, fails the op.
  """
  def checked(pixels, decode_op):
    with tf.control_dependencies(_pixel_checks(tf, pixels, max_pixels)):
      return decode_op(encoded, channels=3)

  def fields(header, start, length, dtype, little_endian=True):
    return tf.io.decode_raw(tf.strings.substr(header, start, length), dtype,
                            little_endian=little_endian)

  def from_jpeg():
    with tf.control_dependencies([jpeg_shape(tf, encoded, max_pixels)]):
      return tf.io.decode_jpeg(encoded, channels=3, dct_method=_JPEG_DCT)

  def from_png():
    size = fields(encoded, 16, 8, tf.int32, little_endian=False)   # width, height
    return checked(tf.reduce_prod(tf.cast(size, tf.int64)), tf.io.decode_png)

  def from_other():
    # A file shorter than a BMP header is padded, so that reading it fails only in PIL.
    head = tf.strings.substr(tf.strings.join([tf.strings.substr(encoded, 0, _BMP_HEADER),
                                              b'\0' * _BMP_HEADER]), 0, _BMP_HEADER)
    bits = fields(head, 28, 2, tf.uint16)[0]
    plain_bmp = (tf.equal(tf.strings.substr(head, 0, 2), b'BM') & ((bits == 24) | (bits == 32))
                 & tf.equal(fields(head, 30, 4, tf.int32)[0], 0))   # not compressed
    # Width and height, negative where rows are stored top-down.
    bmp_pixels = tf.reduce_prod(tf.abs(tf.cast(fields(head, 18, 8, tf.int32), tf.int64)))
    return tf.cond(plain_bmp, lambda: checked(bmp_pixels, tf.io.decode_bmp), with_pil)

  def with_pil():
    image = tf.numpy_function(lambda b: pil_images.decode_bytes(b, max_pixels), [encoded],
                              tf.uint8, stateful=False)
    with tf.control_dependencies([_fails_unless(
        tf, tf.size(image) > 0, 'unreadable, or more pixels than data.max_image_pixels')]):
      return tf.identity(image)

  is_png = tf.equal(tf.strings.substr(encoded, 0, len(_PNG_SIGNATURE)), _PNG_SIGNATURE)
  image = tf.cond(tf.io.is_jpeg(encoded), from_jpeg,
                  lambda: tf.cond(is_png, from_png, from_other))
  image.set_shape([None, None, 3])
  return image


def jpeg_shape(tf, encoded, max_pixels=None):
  """int32 [height, width] of a JPEG, from its header; the op fails on a JPEG of more
  than ``max_pixels`` pixels."""
  shape = tf.io.extract_jpeg_shape(encoded)[:2]
  pixels = tf.reduce_prod(tf.cast(shape, tf.int64))
  with tf.control_dependencies(_pixel_checks(tf, pixels, max_pixels)):
    return tf.identity(shape)


def _pixel_checks(tf, pixels, max_pixels):
  """The ops that fail above ``max_pixels``, to run before a decode."""
  if max_pixels is None:
    return []
  return [_fails_unless(tf, pixels <= max_pixels, 'more pixels than data.max_image_pixels')]


def _fails_unless(tf, condition, message: str):
  """An op that fails where ``condition`` is False. The bare Assert op: tf.debugging's
  asserts add a conditional around it, which cost more than decoding a CIFAR image."""
  return tf.raw_ops.Assert(condition=condition, data=[tf.constant(message)])


def _to_uint8(tf, image):
  return tf.cast(tf.round(tf.clip_by_value(image, 0.0, 255.0)), tf.uint8)


def complete_jpeg(tf, encoded):
  """Whether ``encoded`` is a JPEG that runs to its end marker. A file cut short may
  still hold a window above the cut, so it is decoded whole, and fails as it would in
  every other pass and path."""
  end = tf.strings.substr(encoded, tf.maximum(tf.strings.length(encoded) - 2, 0), 2)
  return tf.io.is_jpeg(encoded) & tf.equal(end, b'\xff\xd9')


def decode_jpeg_window(tf, encoded, image_width, top, left, height, width):
  """The pixels a full decode would give in the window: uint8 [height, width, 3].

  Decodes the window widened by ``_WINDOW_MARGIN`` columns each side and cuts them
  off, because libjpeg-turbo's cropped decode treats the window's side columns as the
  image's edge when it upsamples subsampled chroma, and so changes them (by up to 38
  levels on noise at 4:2:0): one chroma sample beyond the window restores them.
  """
  start = tf.maximum(left - _WINDOW_MARGIN, 0)
  stop = tf.minimum(left + width + _WINDOW_MARGIN, image_width)
  window = tf.io.decode_and_crop_jpeg(encoded, tf.stack([top, start, height, stop - start]),
                                      channels=3, dct_method=_JPEG_DCT)
  return window[:, left - start:left - start + width]


def resize_and_flip(tf, crop, size: int, flip):
  """A float32 crop resized to size x size (bicubic, not antialiased; see
  ``pipeline.train_iterator``), then flipped if ``flip``, as uint8."""
  view = tf.image.resize(crop, [size, size], method='bicubic')
  view = tf.cond(flip, lambda: tf.reverse(view, axis=[1]), lambda: view)
  return _to_uint8(tf, view)


def sample_crop_boxes(tf, shape, draws, area_ranges, aspect_ranges):
  """int32 [views, 4] (top, left, height, width): a random resized crop per view of an
  image of ``shape``, from the view's row of uniform ``draws`` ([views, VIEW_DRAWS])
  and its (low, high) area fraction and aspect ratio.

  Follows ``augment.sample_crop_box`` (the on-device crop used for in-memory data):
  each of the attempts draws an area fraction uniformly and an aspect ratio
  log-uniformly, the first box that fits is kept, and the whole image is used if none
  fits; the offset is uniform over the positions that keep the box inside. The draws
  depend on the seed only and the box on them and the shape, so a window decoded
  alone gives the same view as one cut from the whole image.
  """
  n = _CROP_ATTEMPTS
  height, width = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)

  def affine(ranges):   # [views, 1] float32 low and high - low, rounded as the JAX crop's
    ranges = np.asarray(ranges, np.float64)
    return (tf.constant(ranges[:, :1], tf.float32),
            tf.constant(ranges[:, 1:] - ranges[:, :1], tf.float32))

  low, span = affine(area_ranges)
  area = height * width * (low + span * draws[:, :n])
  low, span = affine(np.log(aspect_ranges))
  aspect = tf.exp(low + span * draws[:, n:2 * n])
  crop_w = tf.round(tf.sqrt(area * aspect))
  crop_h = tf.round(tf.sqrt(area / aspect))
  fits = (crop_h >= 1) & (crop_w >= 1) & (crop_h <= height) & (crop_w <= width)
  first = tf.argmax(tf.cast(fits, tf.int32), axis=1)[:, None]
  found = tf.reduce_any(fits, axis=1)
  crop_h = tf.where(found, tf.gather(crop_h, first, batch_dims=1)[:, 0], height)
  crop_w = tf.where(found, tf.gather(crop_w, first, batch_dims=1)[:, 0], width)
  top = tf.floor(draws[:, 2 * n] * (height - crop_h + 1))
  left = tf.floor(draws[:, 2 * n + 1] * (width - crop_w + 1))
  return tf.cast(tf.stack([top, left, crop_h, crop_w], axis=1), tf.int32)


def resize_and_centre_crop(tf, image, size: int, crop_fraction: float):
  """Shorter side to round(size / crop_fraction), then the central size x size.

  crop_fraction 0.875 at size 224 is the usual ImageNet 256 -> 224 evaluation;
  1.0 keeps the whole of a square image (a no-op for CIFAR at its native size).
  """
  target = round(size / crop_fraction)
  shape = tf.shape(image)
  height, width = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
  scale = target / tf.minimum(height, width)
  new_h = tf.maximum(tf.cast(tf.round(height * scale), tf.int32), target)
  new_w = tf.maximum(tf.cast(tf.round(width * scale), tf.int32), target)
  resized = tf.image.resize(image, tf.stack([new_h, new_w]), method='bicubic', antialias=True)
  top, left = (new_h - size) // 2, (new_w - size) // 2
  return _to_uint8(tf, resized[top:top + size, left:left + size])

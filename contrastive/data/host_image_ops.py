"""The streaming pipeline's image ops, in TensorFlow: decoding, crops and resizes.

Each op works on one example inside a tf.data map of ``pipeline``: decoding any
of JPEG/PNG/GIF/BMP/WebP (or only a JPEG's window), a training view's random
resized crop and flip (the host counterpart of ``augment.sample_crop_box``: the
same rule, so the same uniform draws give the same box), and evaluation's resize
and centre crop. They take the TensorFlow module as their first argument,
so this module never imports it: callers get it from ``tf_import``.
"""

import numpy as np

# Random-resized-crop attempts before falling back to the whole image.
_CROP_ATTEMPTS = 10
# Uniform draws per view: areas and aspects of the attempts, top, left and the flip.
VIEW_DRAWS = 2 * _CROP_ATTEMPTS + 3
# Columns decoded either side of a JPEG crop window and cut off (decode_jpeg_window):
# more than one chroma sample, 2 pixels at 4:2:0 and 4:2:2 (where 2 is measured to be
# exact and 1 not) and 4 at 4:1:1 (which Pillow cannot write, so untested).
_WINDOW_MARGIN = 8


def decode(tf, encoded):
  """Any of JPEG/PNG/GIF/BMP/WebP -> uint8 [H, W, 3] (first frame of an animation)."""
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


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
                                      channels=3)
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

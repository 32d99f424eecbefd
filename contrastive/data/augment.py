"""SimCLR's per-image random augmentations, in pure JAX.

Everything here is traceable (no host callbacks, no Python branching on traced
values), so the augmentations run on the accelerator inside the jitted
per-replica train step. Images are float32 ``[H, W, 3]`` in ``[0, 1]`` inside;
``augment_batch`` and ``preprocess_eval`` are the uint8 batch entry points.
Random choices made "with probability p" are computed for every image and
selected with ``jnp.where``; a probability that is statically 0 drops the op
from the graph instead. The ``aug`` config sections read here are built, with
their defaults, by ``augment_config``.
"""

import functools
import math

import jax
import jax.numpy as jnp

_LUMA = (0.2989, 0.5870, 0.1140)  # Weights of tf.image.rgb_to_grayscale.
# Linear sRGB -> CIE XYZ (IEC 61966-2-1 primaries); each row sums to D65's white.
_SRGB_TO_XYZ = ((0.4124564, 0.3575761, 0.1804375),
                (0.2126729, 0.7151522, 0.0721750),
                (0.0193339, 0.1191920, 0.9503041))
_CROP_ATTEMPTS = 10
_CROP_DRAWS = 2 * _CROP_ATTEMPTS + 2  # Areas, aspects, then top and left.
_JITTER_DRAWS = 8  # Four factors, then four sort keys for the order.


# ------------------------------------------------------------------ geometry


def sample_crop_box(rng, height: int, width: int, area_range, aspect_range):
  """Samples a random-resized-crop box ``(top, left, crop_height, crop_width)``.

  Each of ``_CROP_ATTEMPTS`` attempts draws an area fraction uniformly from
  ``area_range`` and an aspect ratio (width / height) log-uniformly from
  ``aspect_range``; sizes are rounded to whole pixels. All attempts are drawn
  at once and the first one that fits inside the image is kept; if none fits,
  the whole image is used. The offset is then uniform over the positions that
  keep the box inside. All four values are integer-valued float32 scalars.
  """
  draws = jax.random.uniform(rng, (_CROP_DRAWS,))
  return _crop_box(draws, height, width, area_range, aspect_range)


def _crop_box(u, height: int, width: int, area_range, aspect_range):
  """``sample_crop_box`` on ``_CROP_DRAWS`` given uniform draws ``u``."""
  n = _CROP_ATTEMPTS
  lo, hi = area_range
  area = height * width * (lo + (hi - lo) * u[:n])
  lo, hi = math.log(aspect_range[0]), math.log(aspect_range[1])
  aspect = jnp.exp(lo + (hi - lo) * u[n:2 * n])
  crop_w = jnp.round(jnp.sqrt(area * aspect))
  crop_h = jnp.round(jnp.sqrt(area / aspect))
  fits = (crop_h >= 1) & (crop_w >= 1) & (crop_h <= height) & (crop_w <= width)
  first = jnp.argmax(fits)
  crop_h = jnp.where(fits[first], crop_h[first], float(height))
  crop_w = jnp.where(fits[first], crop_w[first], float(width))
  top = jnp.floor(u[2 * n] * (height - crop_h + 1))
  left = jnp.floor(u[2 * n + 1] * (width - crop_w + 1))
  return top, left, crop_h, crop_w


def crop_and_resize(image, box, out_size: int):
  """Resamples ``box`` of ``image`` to out_size squared, bicubic, antialiased.

  A single ``scale_and_translate`` does crop and resize together, so the box
  may be traced and nothing is ever sliced with a dynamic shape.
  """
  top, left, crop_h, crop_w = box
  scale = jnp.stack([out_size / crop_h, out_size / crop_w])
  translation = -jnp.stack([top, left]) * scale
  out = jax.image.scale_and_translate(
      image, (out_size, out_size, image.shape[-1]), (0, 1), scale, translation,
      method='cubic', antialias=True)
  return jnp.clip(out, 0.0, 1.0)  # Bicubic overshoots at edges.


def flip_left_right(image):
  return image[:, ::-1]


# ------------------------------------------------------------------- colour


def _luma(image):
  # Channel by channel, not a reduction over the last axis or a matmul: a
  # size-3 minor axis vectorises badly on CPU, and accelerators may run float32
  # matmuls at reduced precision.
  return sum(w * image[..., c] for c, w in enumerate(_LUMA))


def to_grayscale(image):
  """Luma replicated to three channels, so the shape is unchanged."""
  return jnp.broadcast_to(_luma(image)[..., None], image.shape)


def adjust_brightness(image, factor):
  """Multiplicative, as in SimCLR (not tf.image's additive delta)."""
  return image * factor


def adjust_contrast(image, factor):
  """Blends with the mean luma of the whole image."""
  mean = jnp.mean(_luma(image))
  return mean + factor * (image - mean)


def adjust_saturation(image, factor):
  """Blends each pixel with its own luma."""
  gray = to_grayscale(image)
  return gray + factor * (image - gray)


def _hue_value_chroma(image):
  """Hue in sextants [0, 6) (0 for greys), value (max), chroma (max - min)."""
  r, g, b = image[..., 0], image[..., 1], image[..., 2]
  value = jnp.maximum(jnp.maximum(r, g), b)
  chroma = value - jnp.minimum(jnp.minimum(r, g), b)
  inv_chroma = 1.0 / jnp.where(chroma > 0, chroma, 1.0)
  hue = jnp.where(value == r, (g - b) * inv_chroma,
                  jnp.where(value == g, (b - r) * inv_chroma + 2.0,
                            (r - g) * inv_chroma + 4.0))
  hue = jnp.where(hue < 0, hue + 6.0, hue)
  return hue, value, chroma


def _from_hue_value_chroma(hue, value, chroma):
  """Inverse of ``_hue_value_chroma``, branch-free.

  Channel n (5, 3, 1 for R, G, B) is value - chroma * clip(min(k, 4 - k), 0, 1)
  with k = (n + hue) mod 6. The mod is written with floor: ``jnp.mod`` is a
  scalar library call on CPU and made the whole hue shift ~8x slower there.
  """
  k = jnp.asarray([5.0, 3.0, 1.0], value.dtype) + hue[..., None]
  k = k - 6.0 * jnp.floor(k / 6.0)
  ramp = jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)
  return value[..., None] - chroma[..., None] * ramp


def rgb_to_hsv(image):
  """RGB in [0, 1] to HSV, every channel in [0, 1] (hue as a turn fraction)."""
  hue, value, chroma = _hue_value_chroma(image)
  saturation = chroma / jnp.where(value > 0, value, 1.0)
  return jnp.stack([hue / 6.0, saturation, value], axis=-1)


def hsv_to_rgb(image):
  """Inverse of ``rgb_to_hsv``."""
  hue, saturation, value = image[..., 0], image[..., 1], image[..., 2]
  return _from_hue_value_chroma(6.0 * hue, value, value * saturation)


def adjust_hue(image, delta):
  """Rotates hue by ``delta`` turns (same convention as tf.image.adjust_hue).

  Equivalent to RGB -> HSV, shift H, HSV -> RGB, without materialising HSV:
  a hue rotation keeps value and chroma.
  """
  hue, value, chroma = _hue_value_chroma(image)
  return _from_hue_value_chroma(hue + 6.0 * delta, value, chroma)


def rgb_to_lab(image):
  """sRGB in [0, 1] to CIE L*a*b* under the D65 white: L in [0, 100], a and b
  roughly in [-110, 110] (the sRGB gamut spans a in [-86.2, 98.2], b in
  [-107.9, 94.5]).

  The sRGB transfer curve is undone, the linear RGB taken to XYZ with the sRGB
  primaries, XYZ divided by the white (the matrix's row sums), and the CIE
  cube-root compression applied. X and Z are written as Y plus multiples of
  R - B and G - B (each white-divided row sums to 1), so every grey, white
  included, has a = b = 0 exactly rather than up to rounding: a greyscale image
  gives an ab of zeros. Channel by channel, as :func:`_luma`, so accelerators do
  not run it as a reduced-precision matmul.
  """
  linear = jnp.where(image <= 0.04045, image / 12.92,
                     jnp.power((jnp.maximum(image, 0.04045) + 0.055) / 1.055, 2.4))
  r, g, b = linear[..., 0], linear[..., 1], linear[..., 2]
  rows = [[w / sum(row) for w in row] for row in _SRGB_TO_XYZ]
  y = rows[1][0] * r + rows[1][1] * g + rows[1][2] * b
  x, z = (y + (row[0] - rows[1][0]) * (r - b) + (row[1] - rows[1][1]) * (g - b)
          for row in (rows[0], rows[2]))
  epsilon = (6 / 29) ** 3            # below it f is linear: no infinite slope at 0

  def f(t):
    return jnp.where(t > epsilon, jnp.cbrt(jnp.maximum(t, epsilon)),
                     t / (3 * (6 / 29) ** 2) + 4 / 29)

  fx, fy, fz = f(x), f(y), f(z)
  return jnp.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], axis=-1)


def color_jitter(rng, image, brightness: float, contrast: float,
                 saturation: float, hue: float):
  """SimCLR's colour jitter: four ops in a random order, clipping after each.

  Strengths are static; an op whose strength is 0 is left out, so it is exactly
  the identity and costs nothing. The order is the argsort of uniform draws (a
  uniform random permutation), applied by a ``fori_loop`` over positions with
  a ``lax.switch`` on the op; under vmap every branch is computed and the
  right one selected. A loop rather than unrolling keeps compile time down.
  """
  draws = jax.random.uniform(rng, (_JITTER_DRAWS,))
  return _color_jitter(draws, image, brightness, contrast, saturation, hue)


def _color_jitter(u, image, brightness, contrast, saturation, hue):
  """``color_jitter`` on ``_JITTER_DRAWS`` given uniform draws ``u``."""
  def factor(i, strength):
    lo = max(0.0, 1.0 - strength)
    return lo + (1.0 + strength - lo) * u[i]

  ops = []
  if brightness > 0:
    ops.append(functools.partial(adjust_brightness,
                                 factor=factor(0, brightness)))
  if contrast > 0:
    ops.append(functools.partial(adjust_contrast, factor=factor(1, contrast)))
  if saturation > 0:
    ops.append(functools.partial(adjust_saturation,
                                 factor=factor(2, saturation)))
  if hue > 0:
    ops.append(functools.partial(adjust_hue, delta=hue * (2.0 * u[3] - 1.0)))
  if not ops:
    return image
  order = jnp.argsort(u[4:4 + len(ops)])

  def apply_at(position, x):
    return jnp.clip(jax.lax.switch(order[position], ops, x), 0.0, 1.0)

  return jax.lax.fori_loop(0, len(ops), apply_at, image)


# ---------------------------------------------------------- blur / solarize


def blur_kernel_size(out_size: int) -> int:
  """SimCLR's kernel size, 10% of the image side, made odd and at least 3."""
  radius = max(1, int(out_size * 0.1) // 2)
  return 2 * radius + 1


def gaussian_blur(image, sigma, kernel_size: int):
  """Separable Gaussian blur with reflect padding; ``sigma`` may be traced.

  Each pass is a weighted sum of shifted slices, which stays cheap when the
  kernel differs per image under vmap (a per-image conv kernel would not).
  """
  radius = kernel_size // 2
  taps = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  kernel = jnp.exp(-0.5 * jnp.square(taps / sigma))
  kernel = kernel / jnp.sum(kernel)
  height, width = image.shape[:2]
  padded = jnp.pad(image, ((radius, radius), (radius, radius), (0, 0)),
                   mode='reflect')
  rows = sum(kernel[i] * padded[i:i + height] for i in range(kernel_size))
  return sum(kernel[i] * rows[:, i:i + width] for i in range(kernel_size))


def solarize(image, threshold: float = 0.5):
  return jnp.where(image >= threshold, 1.0 - image, image)


# ----------------------------------------------------------------- pipeline


def _apply_with_prob(draw, prob: float, fn, image):
  """``fn(image)`` if the uniform ``draw`` < ``prob``; static 0 skips ``fn``."""
  if prob <= 0:
    return image
  return jnp.where(draw < prob, fn(image), image)


def _normalize(image, aug):
  if aug.mean is None:
    return image
  mean = jnp.asarray(aug.mean, jnp.float32)
  std = jnp.asarray(aug.std, jnp.float32)
  return (image - mean) / std


def preprocess_eval(images, aug) -> jax.Array:
  """uint8 -> float32 in [0, 1], then (x - mean) / std if ``aug.mean`` is set.

  The deterministic counterpart of ``augment_batch``, so evaluation sees the
  same value range and normalisation as training.
  """
  return _normalize(images.astype(jnp.float32) / 255.0, aug)


def augment_batch(rng, images, aug, out_size: int, crop: bool) -> jax.Array:
  """uint8 [B,H,W,3] -> float32 [B,out_size,out_size,3] augmented views.

  crop=True: random resized crop + flip done here (in-memory datasets);
  crop=False: the host already cropped and flipped (images are out_size
  already), only colour etc. One independent key per image
  (``jax.random.split(rng, B)``). The order follows SimCLR: crop, flip, colour
  jitter, grayscale, blur, solarize, clip, normalise.
  """
  return augment_images(jax.random.split(rng, images.shape[0]), images, aug, out_size,
                        crop)


def global_image_keys(step_key, local_batch: int, axis_name: str):
  """One key per image of this replica, from the image's position in the global
  batch: per-replica augmentation that does not depend on the device count."""
  positions = jax.lax.axis_index(axis_name) * local_batch + jnp.arange(local_batch)
  return jax.vmap(jax.random.fold_in, (None, 0))(step_key, positions)


def augment_images(keys, images, aug, out_size: int, crop: bool) -> jax.Array:
  """:func:`augment_batch` with one given key per image (``keys``: [B]).

  Lets the caller tie each image's randomness to something stable, such as its
  position in the global batch.
  """
  return _normalize(_augment_unnormalized(keys, images, aug, out_size, crop), aug)


def _augment_unnormalized(keys, images, aug, out_size: int, crop: bool) -> jax.Array:
  """:func:`augment_images` before the normalisation: float32 in [0, 1]."""
  if not crop and images.shape[1:3] != (out_size, out_size):
    raise ValueError(f'crop=False needs {out_size}x{out_size} images, got '
                     f'{images.shape[1]}x{images.shape[2]}.')
  # Read the config once, as Python numbers, outside the traced function.
  crop_area, crop_aspect = tuple(aug.crop_area), tuple(aug.crop_aspect)
  flip_prob = float(aug.flip_prob)
  jitter_prob = float(aug.color_jitter_prob)
  jitter = dict(brightness=float(aug.brightness), contrast=float(aug.contrast),
                saturation=float(aug.saturation), hue=float(aug.hue))
  grayscale_prob = float(aug.grayscale_prob)
  blur_prob, blur_sigma = float(aug.blur_prob), tuple(aug.blur_sigma)
  kernel_size = blur_kernel_size(out_size)
  solarize_prob = float(aug.solarize_prob)
  # Only sections that have it (CPC's patches) draw for it, so that adding the
  # field changed no other view's draws.
  channel_drop_prob = float(aug.get('channel_drop_prob', 0.0))
  extra = 2 if channel_drop_prob > 0 else 0

  def augment_one(rng, image):
    # One random call per image feeds every choice: each call compiles to its
    # own sizeable hash graph, so this keeps compile time down.
    u = jax.random.uniform(rng, (_CROP_DRAWS + _JITTER_DRAWS + 6 + extra,))
    crop_u, jitter_u = u[:_CROP_DRAWS], u[_CROP_DRAWS:_CROP_DRAWS + _JITTER_DRAWS]
    rest = u[_CROP_DRAWS + _JITTER_DRAWS:]
    flip_u, jitter_prob_u, gray_u, sigma_u, blur_u, solarize_u = rest[:6]
    x = image.astype(jnp.float32) / 255.0
    if crop:
      box = _crop_box(crop_u, x.shape[0], x.shape[1], crop_area, crop_aspect)
      x = crop_and_resize(x, box, out_size)
      x = _apply_with_prob(flip_u, flip_prob, flip_left_right, x)
    x = _apply_with_prob(jitter_prob_u, jitter_prob,
                         lambda y: _color_jitter(jitter_u, y, **jitter), x)
    x = _apply_with_prob(gray_u, grayscale_prob, to_grayscale, x)
    sigma = blur_sigma[0] + (blur_sigma[1] - blur_sigma[0]) * sigma_u
    x = _apply_with_prob(blur_u, blur_prob,
                         lambda y: gaussian_blur(y, sigma, kernel_size), x)
    x = _apply_with_prob(solarize_u, solarize_prob, solarize, x)
    if extra:
      drop_u, channel_u = rest[6:]
      x = _apply_with_prob(drop_u, channel_drop_prob,
                           lambda y: keep_one_channel(y, channel_u), x)
    return jnp.clip(x, 0.0, 1.0)

  return jax.vmap(augment_one)(keys, images)


def keep_one_channel(image, draw):
  """CPC's colour dropping: one channel, chosen by the uniform ``draw``, kept; the
  other two set to 0, so no colour cue survives between neighbouring patches."""
  kept = jnp.minimum(jnp.floor(draw * 3), 2)
  return jnp.where(jnp.arange(3) == kept, image, 0.0)


# ----------------------------------------------------------------- patch grids


def grid_side(image_size: int, patch_size: int, stride: int) -> int:
  """Patches per row and column of an image cut into a grid."""
  return (image_size - patch_size) // stride + 1


def cut_grid(images, patch_size: int, stride: int) -> jax.Array:
  """``[B, S, S, C] -> [B, G * G, p, p, C]``: overlapping ``p`` x ``p`` patches at
  ``stride``, row by row (patch ``r * G + c`` starts at ``(r, c) * stride``)."""
  side = grid_side(images.shape[1], patch_size, stride)
  return jnp.stack([images[:, r * stride:r * stride + patch_size,
                           c * stride:c * stride + patch_size]
                    for r in range(side) for c in range(side)], axis=1)


def augment_patch_grid(keys, images, aug, size: int, patch_size: int, stride: int,
                       patch_aug, crop: bool) -> jax.Array:
  """CPC's views: ``[B, G * G, p, p, 3]`` patches, each augmented on its own.

  The image first gets ``aug`` at ``size`` (its crop and flip; its colour
  operations, if any), then is cut into the grid (:func:`cut_grid`), then every
  patch gets ``patch_aug`` (a crop within the patch resized back to ``p``, flip,
  colour, ``channel_drop_prob``) with a key folded from its image's key and its
  place in the grid. ``aug``'s normalisation comes last, as evaluation applies it
  to the whole image before cutting the same grid.
  """
  whole = _augment_unnormalized(keys, images, aug, size, crop)
  patches = cut_grid(whole, patch_size, stride)
  batch, count = patches.shape[:2]
  patch_keys = jax.vmap(lambda key: jax.vmap(jax.random.fold_in, (None, 0))(
      key, jnp.arange(count)))(keys).reshape(-1)
  # Values in [0, 255], as _augment_unnormalized reads its uint8 input.
  out = _augment_unnormalized(patch_keys, patches.reshape(-1, *patches.shape[2:]) * 255.0,
                              patch_aug, patch_size, crop=True)
  return _normalize(out, aug).reshape(patches.shape)

"""Behaviour of the on-device SimCLR augmentations."""

import colorsys

import jax
import jax.numpy as jnp
import ml_collections
from absl import flags
from ml_collections import config_flags
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from contrastive.data import augment
from contrastive.data import augment_config

# Everything runs jitted: op-by-op dispatch compiles every primitive on its own
# and is much slower on CPU. A frozen config is hashable, so it can be static.
_augment = jax.jit(augment.augment_batch,
                   static_argnames=('aug', 'out_size', 'crop'))
_blur = jax.jit(augment.gaussian_blur, static_argnames='kernel_size')
_rgb_to_hsv = jax.jit(augment.rgb_to_hsv)
_hsv_to_rgb = jax.jit(augment.hsv_to_rgb)
_adjust_hue = jax.jit(augment.adjust_hue)


def _run(images, aug, crop, out_size=16, key=None):
  key = jax.random.PRNGKey(0) if key is None else key
  frozen = ml_collections.FrozenConfigDict(aug)
  return np.asarray(_augment(key, images, aug=frozen, out_size=out_size,
                             crop=crop))


def _images(batch=4, height=16, width=16, seed=0):
  return np.random.default_rng(seed).integers(
      0, 256, (batch, height, width, 3), dtype=np.uint8)


def _rgb01(shape, seed=0):
  return np.random.default_rng(seed).uniform(size=shape).astype(np.float32)


def _identity_config():
  """Every random op disabled and the crop pinned to the whole image."""
  aug = augment_config.simclr_augment_config()
  aug.crop_area = (1.0, 1.0)
  aug.crop_aspect = (1.0, 1.0)
  aug.flip_prob = 0.0
  aug.color_jitter_prob = 0.0
  aug.grayscale_prob = 0.0
  aug.blur_prob = 0.0
  aug.solarize_prob = 0.0
  return aug


# The full pipeline takes seconds to compile on CPU: tests that need it share
# this config and input shape so it compiles once.
_FULL = augment_config.simclr_augment_config()
_CROP_INPUT = (6, 24, 20)


# ------------------------------------------------------------------ config


def test_config_defaults_and_strength():
  aug = augment_config.simclr_augment_config()
  assert aug.crop_area == (0.08, 1.0)
  assert aug.crop_aspect == pytest.approx((3 / 4, 4 / 3))
  assert aug.brightness == pytest.approx(0.8)
  assert aug.hue == pytest.approx(0.2)
  assert aug.blur_prob == 0.5 and aug.solarize_prob == 0.0
  assert aug.mean is None and aug.std is None
  weak = augment_config.simclr_augment_config(strength=0.5, blur_prob=0.0)
  assert weak.contrast == pytest.approx(0.4)
  assert weak.saturation == pytest.approx(0.4)
  assert weak.hue == pytest.approx(0.1)
  assert weak.blur_prob == 0.0


def test_config_mean_std_from_command_line():
  # mean/std default to None yet must accept tuples from the command line.
  argv = ['prog', '--aug.mean=(0.5,0.4,0.3)', '--aug.std=(0.2,0.2,0.2)']
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_dict('aug', augment_config.simclr_augment_config(),
                                  flag_values=flag_values, sys_argv=argv)
  flag_values(argv)
  assert flag_values.aug.mean == (0.5, 0.4, 0.3)
  assert flag_values.aug.std == (0.2, 0.2, 0.2)


# ------------------------------------------------------------------ pipeline


def test_shapes_dtype_range_and_determinism():
  images = _images(*_CROP_INPUT)
  out = _run(images, _FULL, crop=True)
  assert out.shape == (6, 16, 16, 3) and out.dtype == np.float32
  assert out.min() >= 0.0 and out.max() <= 1.0
  np.testing.assert_array_equal(out, _run(images, _FULL, crop=True))
  other = _run(images, _FULL, crop=True, key=jax.random.PRNGKey(1))
  assert not np.allclose(out, other)
  # The same image repeated in a batch gets a different view in every slot.
  same = _run(np.repeat(images[:1], 6, axis=0), _FULL, crop=True)
  for i in range(6):
    for j in range(i + 1, 6):
      assert not np.allclose(same[i], same[j])


def test_no_crop_path():
  images = _images(batch=5)
  out = _run(images, _FULL, crop=False)
  assert out.shape == (5, 16, 16, 3) and out.dtype == np.float32
  assert out.min() >= 0.0 and out.max() <= 1.0
  assert not np.allclose(out, _run(images, _FULL, crop=False,
                                   key=jax.random.PRNGKey(1)))
  with pytest.raises(ValueError):
    _run(_images(height=20, width=20), _FULL, crop=False)
  # Nothing random left: only the conversion to [0, 1].
  plain = _run(images, _identity_config(), crop=False)
  np.testing.assert_allclose(plain, images / 255.0, atol=1e-6)


def test_identity_crop_and_flip():
  # Copies of one image with flip_prob 0.5: each view is the image itself or
  # exactly its mirror image (one compile covers both cases).
  images = np.repeat(_images(batch=1), 8, axis=0)
  aug = _identity_config()
  aug.flip_prob = 0.5
  out = _run(images, aug, crop=True)
  expected = images[0] / 255.0
  flipped = np.array([np.allclose(view, expected[:, ::-1], atol=1e-3)
                      for view in out])
  assert flipped.any() and not flipped.all()
  for view in out[~flipped]:
    np.testing.assert_allclose(view, expected, atol=1e-3)
  for view in out[flipped]:
    np.testing.assert_array_equal(view, out[~flipped][0][:, ::-1])


def test_grayscale_then_solarize_with_prob_one():
  images = _images(batch=3)
  aug = _identity_config()
  aug.grayscale_prob = 1.0
  aug.solarize_prob = 1.0
  out = _run(images, aug, crop=False)
  np.testing.assert_array_equal(out[..., 0], out[..., 1])
  np.testing.assert_array_equal(out[..., 0], out[..., 2])
  luma = images / 255.0 @ np.array([0.2989, 0.5870, 0.1140])
  np.testing.assert_allclose(out[..., 0], np.where(luma >= 0.5, 1 - luma, luma),
                             atol=1e-5)


def test_blur_in_pipeline_smooths():
  images = _images(batch=4, height=32, width=32)
  aug = _identity_config()
  aug.blur_prob = 1.0
  aug.blur_sigma = (1.5, 2.0)
  out = _run(images, aug, crop=False, out_size=32)
  assert out.var() < 0.5 * (images / 255.0).var()


def test_normalisation_and_eval():
  images = _images(batch=2)
  aug = _identity_config()
  np.testing.assert_allclose(augment.preprocess_eval(images, aug),
                             images / 255.0, atol=1e-6)
  aug.mean = (0.485, 0.456, 0.406)
  aug.std = (0.229, 0.224, 0.225)
  expected = (images / 255.0 - np.array(aug.mean)) / np.array(aug.std)
  evaluated = augment.preprocess_eval(images, aug)
  assert evaluated.dtype == jnp.float32
  np.testing.assert_allclose(evaluated, expected, atol=1e-5)
  np.testing.assert_allclose(_run(images, aug, crop=False), expected, atol=1e-5)


def test_under_shard_map_vmap_and_jit_with_typed_keys():
  # The train step's setting: per replica (shard_map), vmapped, jitted, with
  # new-style typed keys. Jitter and blur are off to save compile time.
  aug = augment_config.simclr_augment_config(blur_prob=0.0)
  aug.color_jitter_prob = 0.0
  images = _images(batch=4)
  keys = jax.random.split(jax.random.key(0), 2)
  mesh = jax.make_mesh((2,), ('data',), devices=jax.devices()[:2],
                       axis_types=(jax.sharding.AxisType.Auto,))
  per_key = jax.vmap(
      lambda key, x: augment.augment_batch(key, x, aug, 16, crop=True),
      in_axes=(0, None))
  sharded = jax.jit(jax.shard_map(
      per_key, mesh=mesh, in_specs=(P('data'), P()), out_specs=P('data')))
  out = np.asarray(sharded(keys, images))
  assert out.shape == (2, 4, 16, 16, 3) and out.dtype == np.float32
  assert out.min() >= 0.0 and out.max() <= 1.0
  assert not np.allclose(out[0], out[1])
  np.testing.assert_array_equal(out, sharded(keys, images))


# ---------------------------------------------------------------- crop box


def test_crop_box_statistics():
  keys = jax.random.split(jax.random.PRNGKey(0), 4000)
  sample = jax.jit(jax.vmap(lambda k: augment.sample_crop_box(
      k, 224, 224, (0.08, 1.0), (3 / 4, 4 / 3))))
  top, left, h, w = (np.asarray(v) for v in sample(keys))
  assert (h >= 1).all() and (w >= 1).all()
  assert (top >= 0).all() and (left >= 0).all()
  assert (top + h <= 224).all() and (left + w <= 224).all()
  area = h * w / 224**2
  aspect = w / h
  # Rounding to whole pixels moves each side by at most half a pixel.
  assert (area >= 0.08 - 0.01).all() and (area <= 1.0).all()
  assert (aspect >= 3 / 4 * 0.98).all() and (aspect <= 4 / 3 * 1.02).all()
  assert 0.08 < area.mean() < 1.0
  assert 0.35 < area.mean() < 0.6  # Uniform area, minus boxes that do not fit.
  assert abs(np.log(aspect).mean()) < 0.02  # Log-uniform: symmetric about 1.
  # Offsets are spread over the whole free range, not pinned to a corner.
  assert (top / np.maximum(224 - h, 1)).mean() == pytest.approx(0.5, abs=0.05)


def test_crop_box_fixed_and_fallback():
  sample = jax.jit(augment.sample_crop_box, static_argnums=(1, 2, 3, 4))
  top, left, h, w = sample(jax.random.PRNGKey(0), 100, 100, (0.25, 0.25),
                           (1.0, 1.0))
  assert (float(h), float(w)) == (50.0, 50.0)
  assert 0 <= float(top) <= 50 and 0 <= float(left) <= 50
  # The whole area at aspect 4 never fits a square: the whole image is used.
  box = sample(jax.random.PRNGKey(0), 30, 30, (1.0, 1.0), (4.0, 4.0))
  assert tuple(float(v) for v in box) == (0.0, 0.0, 30.0, 30.0)


def test_crop_and_resize_picks_the_box():
  # A horizontal ramp: the right half, resized to the full width, holds only
  # the upper half of the values, still increasing left to right.
  ramp = np.tile(np.linspace(0, 1, 64, dtype=np.float32)[None, :, None],
                 (64, 1, 3))
  box = tuple(np.float32(v) for v in (0, 32, 64, 32))
  out = np.asarray(jax.jit(augment.crop_and_resize, static_argnums=2)(
      ramp, box, 16))
  assert out.shape == (16, 16, 3)
  assert out.min() > 0.48 and out.max() <= 1.0
  assert np.all(np.diff(out[0, :, 0]) > 0)


# ------------------------------------------------------------------ colour


def _colour_samples():
  rgb = _rgb01((8, 8, 3))
  rgb[0, :3] = [[0.2, 0.2, 0.2], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]  # Greys.
  rgb[1, :3] = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
  rgb[1, 3:6] = [[1.0, 1.0, 0.0], [0.0, 1.0, 1.0], [1.0, 0.0, 1.0]]  # Ties.
  return rgb


def test_hsv_round_trip_matches_colorsys():
  rgb = _colour_samples()
  hsv = np.asarray(_rgb_to_hsv(rgb))
  expected = np.array([colorsys.rgb_to_hsv(*p) for p in rgb.reshape(-1, 3)])
  np.testing.assert_allclose(hsv.reshape(-1, 3), expected, atol=1e-5)
  back = np.array([colorsys.hsv_to_rgb(*p) for p in expected])
  np.testing.assert_allclose(_hsv_to_rgb(hsv).reshape(-1, 3), back, atol=1e-5)
  np.testing.assert_allclose(_hsv_to_rgb(hsv), rgb, atol=1e-5)


@pytest.mark.parametrize('delta', [-0.45, -0.1, 0.0, 0.2, 0.5])
def test_adjust_hue_matches_colorsys(delta):
  rgb = _colour_samples()
  expected = []
  for pixel in rgb.reshape(-1, 3):
    h, s, v = colorsys.rgb_to_hsv(*pixel)
    expected.append(colorsys.hsv_to_rgb((h + delta) % 1.0, s, v))
  np.testing.assert_allclose(_adjust_hue(rgb, delta).reshape(-1, 3),
                             np.array(expected), atol=1e-5)


def test_brightness_contrast_saturation_grayscale_formulas():
  rgb = _rgb01((8, 8, 3), seed=2)
  luma = rgb @ np.array([0.2989, 0.5870, 0.1140], np.float32)
  np.testing.assert_allclose(augment.adjust_brightness(rgb, 1.3), rgb * 1.3,
                             rtol=1e-6)
  mean = luma.mean()
  np.testing.assert_allclose(augment.adjust_contrast(rgb, 0.6),
                             mean + 0.6 * (rgb - mean), atol=1e-6)
  gray = luma[..., None]
  np.testing.assert_allclose(augment.adjust_saturation(rgb, 1.7),
                             gray + 1.7 * (rgb - gray), atol=1e-6)
  np.testing.assert_allclose(augment.to_grayscale(rgb),
                             np.repeat(gray, 3, axis=-1), atol=1e-6)
  # Factor 1 is the identity; factor 0 collapses onto the blend target.
  for op in (augment.adjust_brightness, augment.adjust_contrast,
             augment.adjust_saturation):
    np.testing.assert_allclose(op(rgb, 1.0), rgb, atol=1e-6)
  np.testing.assert_allclose(augment.adjust_saturation(rgb, 0.0),
                             augment.to_grayscale(rgb), atol=1e-6)


def test_color_jitter():
  rgb = jnp.asarray(_rgb01((8, 8, 3), seed=3))
  same = augment.color_jitter(jax.random.PRNGKey(0), rgb, brightness=0.0,
                              contrast=0.0, saturation=0.0, hue=0.0)
  np.testing.assert_array_equal(same, rgb)
  jitter = jax.jit(jax.vmap(
      lambda k: augment.color_jitter(k, rgb, brightness=0.8, contrast=0.8,
                                     saturation=0.8, hue=0.2)))
  out = np.asarray(jitter(jax.random.split(jax.random.PRNGKey(0), 16)))
  assert out.min() >= 0.0 and out.max() <= 1.0
  assert not np.allclose(out[0], out[1])
  # Brightness alone: the input scaled by one factor in [0.5, 1.5], clipped.
  bright = np.asarray(augment.color_jitter(
      jax.random.PRNGKey(1), rgb, brightness=0.5, contrast=0.0,
      saturation=0.0, hue=0.0))
  factor = float(np.median(bright / np.asarray(rgb)))
  assert 0.5 <= factor <= 1.5
  np.testing.assert_allclose(bright, np.clip(rgb * factor, 0, 1), atol=1e-5)


# -------------------------------------------------------------------- blur


def test_gaussian_blur():
  assert augment.blur_kernel_size(32) == 3
  assert augment.blur_kernel_size(224) == 23
  assert augment.blur_kernel_size(8) == 3
  noise = _rgb01((32, 32, 3), seed=4)
  np.testing.assert_allclose(_blur(noise, 0.1, kernel_size=3), noise,
                             atol=1e-4)
  smooth = _blur(noise, 3.0, kernel_size=7)
  assert smooth.shape == noise.shape
  assert float(smooth.var()) < 0.2 * float(noise.var())
  flat = np.full((32, 32, 3), 0.3, np.float32)
  np.testing.assert_allclose(_blur(flat, 2.0, kernel_size=7), flat, atol=1e-6)

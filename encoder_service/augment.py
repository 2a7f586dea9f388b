"""Training-time augmentation: batches of [N, 28, 28, 1] float32 in [0, 1], changed at random on the fly.

The served model sees images from other sources than its training set (a drawing canvas, scans, other
pens), so training shows it small versions of those differences. Presets, by what the images are:
- `digits`: shifts up to 3 px, rotations up to 12 degrees, scaling up to 12 %, and, on some images,
  strokes made thicker or thinner by a pixel or blurred;
- `clothes`: left-right mirroring and shifts by whole pixels, up to 2 (garments are photographed
  upright and centred, and a mirrored shirt is still a shirt; whole pixels, because a bilinear
  fractional shift blurs a texture that test images show sharp);
- `none`.

TensorFlow ops only, so they run inside a `tf.data` pipeline beside training.
"""

from __future__ import annotations

import math
from typing import Any

PRESETS = ("digits", "clothes", "none")


def augment(x: Any, preset: str) -> Any:
    """Returns a changed copy of the batch `x` (a tf.Tensor [N, 28, 28, 1]) for the preset."""
    import tensorflow as tf

    if preset == "none":
        return x
    if preset == "clothes":
        flip = tf.random.uniform([tf.shape(x)[0], 1, 1, 1]) < 0.5
        x = tf.where(flip, tf.image.flip_left_right(x), x)
        return _affine(x, shift=2.0, degrees=0.0, zoom=0.0, whole_pixels=True)
    if preset == "digits":
        x = _affine(x, shift=3.0, degrees=12.0, zoom=0.12)
        return _strokes(x)
    raise ValueError(f"unknown augmentation {preset!r}; known: {', '.join(PRESETS)}")


def _affine(x: Any, shift: float, degrees: float, zoom: float, whole_pixels: bool = False) -> Any:
    """A random rotation, scale and shift about the image centre per image (bilinear, black fill);
    `whole_pixels` rounds the shift, which then moves pixels without interpolating them."""
    import tensorflow as tf

    n = tf.shape(x)[0]
    angle = tf.random.uniform([n], -degrees, degrees) * (math.pi / 180.0)
    inverse_scale = tf.exp(-tf.random.uniform([n], -zoom, zoom))
    dx, dy = tf.random.uniform([n], -shift, shift), tf.random.uniform([n], -shift, shift)
    if whole_pixels:
        dx, dy = tf.round(dx), tf.round(dy)
    cos, sin = tf.cos(angle) * inverse_scale, tf.sin(angle) * inverse_scale
    centre = 13.5
    # ImageProjectiveTransformV3 maps each output pixel (x, y) to the input pixel it samples.
    a2 = centre - cos * centre + sin * centre - dx
    b2 = centre - sin * centre - cos * centre - dy
    zeros = tf.zeros([n])
    transforms = tf.stack([cos, -sin, a2, sin, cos, b2, zeros, zeros], axis=1)
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=x,
        transforms=transforms,
        output_shape=tf.shape(x)[1:3],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )


def _strokes(x: Any) -> Any:
    """Thicker strokes (a 2x2 max filter) on 20 % of the images, thinner (2x2 min) on 15 %, and a 3x3
    binomial blur on 20 %."""
    import tensorflow as tf

    n = tf.shape(x)[0]
    pick = tf.random.uniform([n, 1, 1, 1])
    thicker = tf.nn.max_pool2d(x, 2, 1, "SAME")
    thinner = -tf.nn.max_pool2d(-x, 2, 1, "SAME")
    x = tf.where(pick < 0.2, thicker, tf.where(pick < 0.35, thinner, x))
    kernel = tf.constant([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16.0
    blurred = tf.nn.conv2d(x, kernel[:, :, None, None], 1, "SAME")
    x = tf.where(tf.random.uniform([n, 1, 1, 1]) < 0.2, blurred, x)
    return tf.clip_by_value(x, 0.0, 1.0)

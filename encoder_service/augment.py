"""Training-time augmentation: batches of [N, H, W, C] float32 in [0, 1], changed at random on the fly.

The served model sees images from other sources than its training set (a drawing canvas, scans, other
pens), so training shows it small versions of those differences. Presets, by what the images are:
- `digits`: shifts up to 3 px, rotations up to 12 degrees, scaling up to 12 %, and, on some images,
  strokes made thicker or thinner by a pixel or blurred;
- `clothes`: left-right mirroring and shifts by whole pixels, up to 2 (garments are photographed
  upright and centred, and a mirrored shirt is still a shirt; whole pixels, because a bilinear
  fractional shift blurs a texture that test images show sharp);
- `garments`: for learning clothes without labels: left-right mirroring, shifts up to 3 px, rotations up
  to 8 degrees, scaling up to 15 % and a contrast gain of 0.7-1.3 (measured: the autoencoder on it beat the
  contrastive recipe on Fashion-MNIST, see `encoder_service.train`);
- `photo`: for photo models (colour, any size): left-right mirroring, shifts up to an eighth of the side,
  rotations up to 10 degrees, scaling up to 20 % (the border filled with the image's border colour, as
  the photo preprocessing pads), and jittered brightness, contrast and saturation;
- `photo-geometry`: `photo` without the colour jitter (the self-supervised photo recipe's: an autoencoder
  learns from colours, so changing them only costs it; measured in `encoder_service.train`);
- `none`.

TensorFlow ops only, so they run inside a `tf.data` pipeline beside training.
"""

from __future__ import annotations

import math
from typing import Any

PRESETS = ("digits", "clothes", "garments", "photo", "photo-geometry", "none")


def augment(x: Any, preset: str) -> Any:
    """Returns a changed copy of the batch `x` (a tf.Tensor [N, H, W, C]) for the preset."""
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
    if preset == "garments":
        flip = tf.random.uniform([tf.shape(x)[0], 1, 1, 1]) < 0.5
        x = tf.where(flip, tf.image.flip_left_right(x), x)
        x = _affine(x, shift=3.0, degrees=8.0, zoom=0.15)
        return tf.clip_by_value(x * tf.random.uniform([tf.shape(x)[0], 1, 1, 1], 0.7, 1.3), 0.0, 1.0)
    if preset in ("photo", "photo-geometry"):
        flip = tf.random.uniform([tf.shape(x)[0], 1, 1, 1]) < 0.5
        x = tf.where(flip, tf.image.flip_left_right(x), x)
        side = tf.cast(tf.shape(x)[1], tf.float32)
        x = _affine(x, shift=side / 8.0, degrees=10.0, zoom=0.2, fill="border")
        return _colour_jitter(x) if preset == "photo" else x
    raise ValueError(f"unknown augmentation {preset!r}; known: {', '.join(PRESETS)}")


def _affine(
    x: Any, shift: Any, degrees: float, zoom: float, whole_pixels: bool = False, fill: str = "black"
) -> Any:
    """A random rotation, scale and shift about the image centre per image (bilinear); what falls outside
    is black (`fill="black"`, the digits' background) or the nearest edge pixel's colour ("border", as a
    photo is padded); `whole_pixels` rounds the shift, which then moves pixels without interpolating them."""
    import tensorflow as tf

    n = tf.shape(x)[0]
    angle = tf.random.uniform([n], -degrees, degrees) * (math.pi / 180.0)
    inverse_scale = tf.exp(-tf.random.uniform([n], -zoom, zoom))
    dx, dy = tf.random.uniform([n], -shift, shift), tf.random.uniform([n], -shift, shift)
    if whole_pixels:
        dx, dy = tf.round(dx), tf.round(dy)
    cos, sin = tf.cos(angle) * inverse_scale, tf.sin(angle) * inverse_scale
    centre_x = (tf.cast(tf.shape(x)[2], tf.float32) - 1.0) / 2.0
    centre_y = (tf.cast(tf.shape(x)[1], tf.float32) - 1.0) / 2.0
    # ImageProjectiveTransformV3 maps each output pixel (x, y) to the input pixel it samples.
    a2 = centre_x - cos * centre_x + sin * centre_y - dx
    b2 = centre_y - sin * centre_x - cos * centre_y - dy
    zeros = tf.zeros([n])
    transforms = tf.stack([cos, -sin, a2, sin, cos, b2, zeros, zeros], axis=1)
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=x,
        transforms=transforms,
        output_shape=tf.shape(x)[1:3],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="CONSTANT" if fill == "black" else "NEAREST",
    )


def _colour_jitter(x: Any) -> Any:
    """Brightness shifted by up to 0.15, contrast and saturation scaled by 0.7-1.3 and 0.5-1.5, per image
    (saturation about each pixel's gray; a gray image stays gray)."""
    import tensorflow as tf

    n = tf.shape(x)[0]
    mean = tf.reduce_mean(x, axis=[1, 2, 3], keepdims=True)
    x = (x - mean) * tf.random.uniform([n, 1, 1, 1], 0.7, 1.3) + mean
    x = x + tf.random.uniform([n, 1, 1, 1], -0.15, 0.15)
    gray = tf.reduce_mean(x, axis=3, keepdims=True)
    x = (x - gray) * tf.random.uniform([n, 1, 1, 1], 0.5, 1.5) + gray
    return tf.clip_by_value(x, 0.0, 1.0)


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
    if x.shape[-1] == 1:  # gray: the convolution the shipped digit models were trained with
        blurred = tf.nn.conv2d(x, kernel[:, :, None, None], 1, "SAME")
    else:  # each channel blurred alone
        channels = tf.shape(x)[3]
        kernels = tf.tile(kernel[:, :, None, None], [1, 1, channels, 1])
        blurred = tf.nn.depthwise_conv2d(x, kernels, [1, 1, 1, 1], "SAME")
    x = tf.where(tf.random.uniform([n, 1, 1, 1]) < 0.2, blurred, x)
    return tf.clip_by_value(x, 0.0, 1.0)

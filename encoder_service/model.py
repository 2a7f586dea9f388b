"""The convolutional autoencoders whose bottleneck is the image embedding.

Architectures are registered by name in `ARCHITECTURES` and picked with
`python -m encoder_service.train --model NAME`:
- `tutorial`: the tutorial's small autoencoder, its flattened 4x4x8 bottleneck as the embedding;
- `wide` (the default): wider convolutions (32, 64, 128) and a 4x4x128 map projected to 128 dims,
  L2-normalised, trained beside the reconstruction with a cosine class head (`CosineHead`).

Each builder returns
`(autoencoder, encoder)`: two Keras models that share their layers, the autoencoder compiled for
training and the encoder mapping a [N, 28, 28, 1] float32 batch in [0, 1] to [N, EMBEDDING_DIM].

This module imports Keras (and so TensorFlow): the serving runtimes in `encoder_service.runtime`
do not import it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import keras
import numpy as np
from keras import layers

from encoder_service.shapes import DEFAULT_INPUT_SHAPE, check_input_shape

INPUT_SHAPE: tuple[int, int, int] = DEFAULT_INPUT_SHAPE
EMBEDDING_DIM = 128
DEFAULT_ARCHITECTURE = "wide"


def build_tutorial(input_shape: tuple[int, int, int] = INPUT_SHAPE) -> tuple[keras.Model, keras.Model]:
    """The tutorial's autoencoder, in Keras 3.

    Encoder: Conv2D 32, 16, 8 (3x3, relu, same), each followed by MaxPooling2D 2x2 (same):
    28 -> 14 -> 7 -> 4, a 4x4x8 bottleneck, flattened to the 128-d embedding.
    Decoder, mirrored: Conv2D 8 (same) + UpSampling -> 8x8, Conv2D 16 (same) + UpSampling -> 16x16,
    Conv2D 32 with 'valid' padding -> 14x14 (as the tutorial's classic decoder does, so the output
    comes back to 28x28) + UpSampling -> 28x28, then a sigmoid Conv2D(1, 3x3, same).
    Compiled with Adam and binary cross-entropy.
    """
    if input_shape != INPUT_SHAPE:
        return _tutorial_of_any_size(input_shape)
    inputs = keras.Input(shape=INPUT_SHAPE, name="image")
    x = layers.Conv2D(32, (3, 3), activation="relu", padding="same", name="enc_conv1")(inputs)
    x = layers.MaxPooling2D((2, 2), padding="same", name="enc_pool1")(x)
    x = layers.Conv2D(16, (3, 3), activation="relu", padding="same", name="enc_conv2")(x)
    x = layers.MaxPooling2D((2, 2), padding="same", name="enc_pool2")(x)
    x = layers.Conv2D(8, (3, 3), activation="relu", padding="same", name="enc_conv3")(x)
    bottleneck = layers.MaxPooling2D((2, 2), padding="same", name="bottleneck")(x)  # 4x4x8
    embedding = layers.Flatten(name="embedding")(bottleneck)  # 128

    x = layers.Conv2D(8, (3, 3), activation="relu", padding="same", name="dec_conv1")(bottleneck)
    x = layers.UpSampling2D((2, 2), name="dec_up1")(x)  # 8x8
    x = layers.Conv2D(16, (3, 3), activation="relu", padding="same", name="dec_conv2")(x)
    x = layers.UpSampling2D((2, 2), name="dec_up2")(x)  # 16x16
    x = layers.Conv2D(32, (3, 3), activation="relu", padding="valid", name="dec_conv3")(x)  # 14x14
    x = layers.UpSampling2D((2, 2), name="dec_up3")(x)  # 28x28
    outputs = layers.Conv2D(1, (3, 3), activation="sigmoid", padding="same", name="reconstruction")(x)

    autoencoder = keras.Model(inputs, outputs, name="autoencoder")
    encoder = keras.Model(inputs, embedding, name="encoder")
    autoencoder.compile(optimizer="adam", loss="binary_crossentropy")
    return autoencoder, encoder


def _tutorial_of_any_size(input_shape: tuple[int, int, int]) -> tuple[keras.Model, keras.Model]:
    """The tutorial's layers for another input: the bottleneck is the pooled map projected to 128 dims (a
    flattened 4x4x8 map is 128 only at 28x28), and the decoder doubles a quarter-size map back twice."""
    height, width, channels = input_shape
    inputs = keras.Input(shape=input_shape, name="image")
    x = inputs
    for n, filters in enumerate((32, 16, 8), start=1):
        x = layers.Conv2D(filters, (3, 3), activation="relu", padding="same", name=f"enc_conv{n}")(x)
        x = layers.MaxPooling2D((2, 2), padding="same", name=f"enc_pool{n}")(x)
    embedding = layers.Dense(EMBEDDING_DIM, name="embedding")(layers.Flatten(name="bottleneck")(x))
    x = layers.Dense((height // 4) * (width // 4) * 8, activation="relu", name="dec_dense")(embedding)
    x = layers.Reshape((height // 4, width // 4, 8), name="dec_reshape")(x)
    x = layers.Conv2DTranspose(16, (3, 3), strides=2, activation="relu", padding="same", name="dec_up1")(x)
    x = layers.Conv2DTranspose(32, (3, 3), strides=2, activation="relu", padding="same", name="dec_up2")(x)
    outputs = layers.Conv2D(channels, (3, 3), activation="sigmoid", padding="same", name="reconstruction")(x)
    autoencoder = keras.Model(inputs, outputs, name="autoencoder")
    encoder = keras.Model(inputs, embedding, name="encoder")
    autoencoder.compile(optimizer="adam", loss="binary_crossentropy")
    return autoencoder, encoder


def build_wide(input_shape: tuple[int, int, int] = INPUT_SHAPE) -> tuple[keras.Model, keras.Model]:
    """The tutorial's family, widened: a better embedding for the same 128 float32 dims.

    Encoder: Conv2D 32, 64, 128 (3x3, relu, same), each followed by MaxPooling2D 2x2 (same):
    28 -> 14 -> 7 -> 4, a 4x4x128 map (2,048 values: the wider bottleneck), flattened and projected by
    a Dense layer to 128 dims, then L2-normalised (`UnitNormalization`): exact L2 between unit
    vectors ranks as cosine similarity does, and every embedding has the same scale.
    Decoder, from the unit embedding: Dense 7x7x16 (relu), Conv2DTranspose 16 and 8 (3x3, stride 2,
    relu) -> 28x28, a sigmoid Conv2D(1, 3x3). Light on purpose: the embedding, not the picture, is
    the product, and the decoder's cost is paid on every training step.
    Compiled for reconstruction alone (Adam, binary cross-entropy); training adds the class head.
    """
    height, width, channels = input_shape
    inputs = keras.Input(shape=input_shape, name="image")
    x = inputs
    for n, filters in enumerate((32, 64, 128), start=1):
        x = layers.Conv2D(filters, (3, 3), activation="relu", padding="same", name=f"enc_conv{n}")(x)
        x = layers.MaxPooling2D((2, 2), padding="same", name=f"enc_pool{n}")(x)
    x = layers.Flatten(name="bottleneck")(x)  # 4x4x128 at 28x28
    code = layers.Dense(EMBEDDING_DIM, name="projection")(x)
    embedding = layers.UnitNormalization(name="embedding")(code)

    # The decoder doubles a quarter-size map back twice (7x7 -> 28x28 for digits); colour gets the widths of
    # the encoder's first layers, as 3 channels carry more than 1.
    first, second = (16, 8) if channels == 1 else (64, 32)
    x = layers.Dense((height // 4) * (width // 4) * first, activation="relu", name="dec_dense")(embedding)
    x = layers.Reshape((height // 4, width // 4, first), name="dec_reshape")(x)
    x = layers.Conv2DTranspose(first, (3, 3), strides=2, activation="relu", padding="same", name="dec_up1")(x)
    x = layers.Conv2DTranspose(second, (3, 3), strides=2, activation="relu", padding="same", name="dec_up2")(
        x
    )
    outputs = layers.Conv2D(channels, (3, 3), activation="sigmoid", padding="same", name="reconstruction")(x)

    autoencoder = keras.Model(inputs, outputs, name="autoencoder")
    encoder = keras.Model(inputs, embedding, name="encoder")
    autoencoder.compile(optimizer="adam", loss="binary_crossentropy")
    return autoencoder, encoder


@keras.saving.register_keras_serializable(package="imgsearch")
class CosineHead(layers.Layer):
    """Cosine similarity of each unit embedding to one learnt unit direction per class.

    Trained with softmax cross-entropy on `scale * (cosine - margin at the true class)` (CosFace):
    the embeddings of a class gather around its direction, away from the others, which is what
    nearest-neighbour search by L2 on unit vectors rewards. Used in training only; never served."""

    def __init__(self, classes: int, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.classes = classes

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        self.directions = self.add_weight(
            name="directions", shape=(int(input_shape[-1] or 0), self.classes), initializer="glorot_uniform"
        )

    def call(self, embedding: object) -> object:
        return keras.ops.matmul(embedding, keras.ops.normalize(self.directions, axis=0))

    def get_config(self) -> dict[str, object]:
        return {**super().get_config(), "classes": self.classes}


@keras.saving.register_keras_serializable(package="imgsearch")
class Unwhiten(layers.Layer):
    """The inverse of a whitened unit embedding (`encoder_service.whitening`): from the served unit vector
    s = normalise((e - mean) @ W) back to the unit embedding e the decoder was trained on. With z = s @ W^-1,
    e = mean + t z for the one t > 0 that makes |e| = 1 (|mean| < 1: the mean of unit vectors), the
    positive root of t^2 |z|^2 + 2 t (mean . z) + |mean|^2 - 1 = 0. Exact: Reconstruct and novelty are what
    they were before the whitening."""

    def __init__(self, dim: int, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.dim = dim

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        self.mean = self.add_weight(name="mean", shape=(self.dim,), initializer="zeros", trainable=False)
        self.inverse = self.add_weight(
            name="inverse", shape=(self.dim, self.dim), initializer="identity", trainable=False
        )

    def call(self, served: object) -> object:
        ops = keras.ops
        z = ops.matmul(served, self.inverse)
        a = ops.sum(z * z, axis=-1, keepdims=True)
        b = ops.sum(z * self.mean, axis=-1, keepdims=True)
        c = ops.sum(self.mean * self.mean) - 1.0
        t = (-b + ops.sqrt(ops.maximum(b * b - a * c, 0.0))) / ops.maximum(a, 1e-12)
        return self.mean + t * z

    def get_config(self) -> dict[str, object]:
        return {**super().get_config(), "dim": self.dim}


def cosine_margin_loss(classes: int, scale: float, margin: float) -> Callable[[object, object], object]:
    """Softmax cross-entropy on `scale * (cosine - margin * one_hot(label))`: CosFace's loss for
    `CosineHead`."""

    def loss(labels: object, cosines: object) -> object:
        ops = keras.ops
        one_hot = ops.one_hot(ops.reshape(ops.cast(labels, "int32"), (-1,)), classes)
        logits = scale * (cosines - margin * one_hot)
        return ops.mean(keras.losses.categorical_crossentropy(one_hot, logits, from_logits=True))

    return loss


ARCHITECTURES: dict[str, Callable[[tuple[int, int, int]], tuple[keras.Model, keras.Model]]] = {
    "tutorial": build_tutorial,
    "wide": build_wide,
}


def build_autoencoder(
    name: str = DEFAULT_ARCHITECTURE, input_shape: tuple[int, int, int] = INPUT_SHAPE
) -> tuple[keras.Model, keras.Model]:
    """Returns `(autoencoder, encoder)` of the named architecture for the input shape, sharing layers.

    Raises ValueError naming the known architectures when `name` is not one of them, and saying what a
    shape must be when the shape is not one they can take (shapes.check_input_shape)."""
    try:
        builder = ARCHITECTURES[name]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ValueError(f"unknown model architecture {name!r}; known: {known}") from None
    input_shape = check_input_shape(tuple(input_shape))  # type: ignore[arg-type]
    autoencoder, encoder = builder(input_shape)
    if tuple(encoder.input_shape[1:]) != input_shape or tuple(encoder.output_shape[1:]) != (EMBEDDING_DIM,):
        raise AssertionError(
            f"architecture {name!r} maps {encoder.input_shape} to {encoder.output_shape}, "
            f"expected {(None, *input_shape)} to {(None, EMBEDDING_DIM)}"
        )
    if tuple(autoencoder.output_shape[1:]) != input_shape:
        raise AssertionError(
            f"architecture {name!r} reconstructs {autoencoder.output_shape}, not {input_shape}"
        )
    return autoencoder, encoder


def weights_digest(model: keras.Model) -> str:
    """Hex sha256 over the model's weights: little-endian float32 bytes, concatenated in layer order.

    Deterministic for the same weights (unlike the bytes of a .keras zip, which hold timestamps)."""
    digest = hashlib.sha256()
    for weight in model.get_weights():
        digest.update(np.ascontiguousarray(weight, dtype="<f4").tobytes())
    return digest.hexdigest()


def model_version(architecture: str, encoder: keras.Model) -> str:
    """The content-hash version of an encoder: "<architecture>-" + the first 12 hex of `weights_digest`."""
    return f"{architecture}-{weights_digest(encoder)[:12]}"

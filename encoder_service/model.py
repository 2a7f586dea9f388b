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

INPUT_SHAPE: tuple[int, int, int] = (28, 28, 1)
EMBEDDING_DIM = 128
DEFAULT_ARCHITECTURE = "wide"


def build_tutorial() -> tuple[keras.Model, keras.Model]:
    """The tutorial's autoencoder, in Keras 3.

    Encoder: Conv2D 32, 16, 8 (3x3, relu, same), each followed by MaxPooling2D 2x2 (same):
    28 -> 14 -> 7 -> 4, a 4x4x8 bottleneck, flattened to the 128-d embedding.
    Decoder, mirrored: Conv2D 8 (same) + UpSampling -> 8x8, Conv2D 16 (same) + UpSampling -> 16x16,
    Conv2D 32 with 'valid' padding -> 14x14 (as the tutorial's classic decoder does, so the output
    comes back to 28x28) + UpSampling -> 28x28, then a sigmoid Conv2D(1, 3x3, same).
    Compiled with Adam and binary cross-entropy.
    """
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


def build_wide() -> tuple[keras.Model, keras.Model]:
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
    inputs = keras.Input(shape=INPUT_SHAPE, name="image")
    x = inputs
    for n, width in enumerate((32, 64, 128), start=1):
        x = layers.Conv2D(width, (3, 3), activation="relu", padding="same", name=f"enc_conv{n}")(x)
        x = layers.MaxPooling2D((2, 2), padding="same", name=f"enc_pool{n}")(x)
    x = layers.Flatten(name="bottleneck")(x)  # 4x4x128
    code = layers.Dense(EMBEDDING_DIM, name="projection")(x)
    embedding = layers.UnitNormalization(name="embedding")(code)

    x = layers.Dense(7 * 7 * 16, activation="relu", name="dec_dense")(embedding)
    x = layers.Reshape((7, 7, 16), name="dec_reshape")(x)
    x = layers.Conv2DTranspose(16, (3, 3), strides=2, activation="relu", padding="same", name="dec_up1")(x)
    x = layers.Conv2DTranspose(8, (3, 3), strides=2, activation="relu", padding="same", name="dec_up2")(x)
    outputs = layers.Conv2D(1, (3, 3), activation="sigmoid", padding="same", name="reconstruction")(x)

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


def cosine_margin_loss(classes: int, scale: float, margin: float) -> Callable[[object, object], object]:
    """Softmax cross-entropy on `scale * (cosine - margin * one_hot(label))`: CosFace's loss for
    `CosineHead`."""

    def loss(labels: object, cosines: object) -> object:
        ops = keras.ops
        one_hot = ops.one_hot(ops.reshape(ops.cast(labels, "int32"), (-1,)), classes)
        logits = scale * (cosines - margin * one_hot)
        return ops.mean(keras.losses.categorical_crossentropy(one_hot, logits, from_logits=True))

    return loss


ARCHITECTURES: dict[str, Callable[[], tuple[keras.Model, keras.Model]]] = {
    "tutorial": build_tutorial,
    "wide": build_wide,
}


def build_autoencoder(name: str = DEFAULT_ARCHITECTURE) -> tuple[keras.Model, keras.Model]:
    """Returns `(autoencoder, encoder)` of the named architecture, sharing layers.

    Raises ValueError naming the known architectures when `name` is not one of them."""
    try:
        builder = ARCHITECTURES[name]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ValueError(f"unknown model architecture {name!r}; known: {known}") from None
    autoencoder, encoder = builder()
    if tuple(encoder.input_shape[1:]) != INPUT_SHAPE or tuple(encoder.output_shape[1:]) != (EMBEDDING_DIM,):
        raise AssertionError(
            f"architecture {name!r} maps {encoder.input_shape} to {encoder.output_shape}, "
            f"expected {(None, *INPUT_SHAPE)} to {(None, EMBEDDING_DIM)}"
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

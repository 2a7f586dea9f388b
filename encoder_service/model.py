"""The convolutional autoencoder whose flattened bottleneck is the image embedding.

Architectures are registered by name in `ARCHITECTURES`, so a stronger model can be added later
and picked with `python -m encoder_service.train --model NAME`. Each builder returns
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
DEFAULT_ARCHITECTURE = "tutorial"


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


ARCHITECTURES: dict[str, Callable[[], tuple[keras.Model, keras.Model]]] = {
    "tutorial": build_tutorial,
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

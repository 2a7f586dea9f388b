"""The decoder of a model directory: split from `autoencoder.keras`, written as `decoder.tflite`.

    python -m encoder_service.export encoder_service/models/default [MODEL_DIR ...]

The encoder service's `Reconstruct` runs the decoder on the served embedding, so the decoder's input is
exactly the encoder's output: for `wide` the unit-normalised 128-d embedding, for `tutorial` the
flattened 4x4x8 bottleneck (reshaped back to 4x4x8 first). Training writes `decoder.tflite` itself
(`encoder_service.train` calls `write_decoder`); this command adds it to a model directory trained
before, without retraining and without touching the encoder's files or `card.json`: the model version
stays what it was. It checks before writing that `encoder.keras` is the model the card names (its weights'
hash), that decoder(encoder(x)) equals autoencoder(x), and that the flatbuffer agrees with Keras.

The LiteRT runtime serves `decoder.tflite`; the TensorFlow runtime splits the decoder from
`autoencoder.keras` at start with `split_decoder`, so both run the same layers. Imports TensorFlow.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from encoder_service.model_dir import (
    AUTOENCODER_KERAS,
    DECODER_TFLITE,
    ENCODER_KERAS,
    MAX_ABS_DIFF,
    check_tflite,
    read_card,
    to_tflite,
)


def split_decoder(autoencoder: Any, encoder: Any) -> Any:
    """The decoder of `autoencoder` as a Keras model from the embedding `encoder` outputs ([N, dim])
    to the reconstruction ([N, 28, 28, 1]), sharing the autoencoder's layers (and so its weights);
    nearest-neighbour upsampling is done by an equivalent layer that LiteRT can convert (`_portable`).

    The decoder is the chain of the autoencoder's layers that the encoder does not have (matched by
    name). It must start from the encoder's output, or from the layer the encoder's output flattens
    (the `tutorial` bottleneck), which the decoder then reshapes back. Raises ValueError otherwise."""
    import keras

    encoder_layers = {layer.name: layer for layer in encoder.layers}
    chain = [layer for layer in autoencoder.layers if layer.name not in encoder_layers]
    if not chain:
        raise ValueError(f"{autoencoder.name} has no layers beyond the encoder's: no decoder")
    parents = [_parent(layer) for layer in chain]
    for layer, parent, before in zip(chain[1:], parents[1:], chain, strict=False):
        if parent != before.name:
            raise ValueError(f"the decoder is not a chain: {layer.name} follows {parent}, not {before.name}")
    output_layer = encoder.layers[-1]
    embedding = keras.Input(shape=tuple(encoder.output_shape[1:]), name="embedding")
    x = embedding
    if parents[0] == output_layer.name:
        pass  # the decoder starts from the embedding itself (`wide`)
    elif isinstance(output_layer, keras.layers.Flatten) and _parent(output_layer) == parents[0]:
        start = tuple(encoder_layers[parents[0]].output.shape[1:])  # the map the embedding flattens
        x = keras.layers.Reshape(start, name="unflatten")(x)
    else:
        raise ValueError(
            f"the decoder starts from {parents[0]}, neither the embedding ({output_layer.name}) "
            "nor the layer it flattens"
        )
    for layer in chain:
        x = _portable(layer, x)(x)
    return keras.Model(embedding, x, name="decoder")


def _portable(layer: Any, x: Any) -> Any:
    """`layer`, or for a nearest-neighbour UpSampling2D the Resizing layer that computes the same on the
    input `x`: Keras's UpSampling2D repeats with reshapes that lose the static shape when the batch size is
    dynamic, which the LiteRT converter cannot lower (its Conv2D after it fails); Resizing becomes LiteRT's
    RESIZE_NEAREST_NEIGHBOR, exact for whole factors (pixel i of the output is pixel i // factor)."""
    import keras

    if not (
        isinstance(layer, keras.layers.UpSampling2D)
        and layer.interpolation == "nearest"
        and layer.data_format == "channels_last"
    ):
        return layer
    height, width = (int(v) for v in x.shape[1:3])
    size_h, size_w = (int(v) for v in layer.size)
    return keras.layers.Resizing(height * size_h, width * size_w, interpolation="nearest", name=layer.name)


def _parent(layer: Any) -> str:
    """The name of the one layer whose output `layer` takes in the model it was first called in (the
    autoencoder: a decoder split from it calls its layers again)."""
    (parent,) = layer._inbound_nodes[0].parent_nodes
    return str(parent.operation.name)


def write_decoder(autoencoder: Any, encoder: Any, model_dir: Path, x: np.ndarray) -> dict[str, float | None]:
    """Writes `decoder.tflite` into `model_dir` (through a temporary file and a rename) after checking, on
    the float32 [N, 28, 28, 1] images `x`, that decoder(encoder(x)) matches autoencoder(x) and the
    flatbuffer matches Keras. Returns both max abs differences (the LiteRT one None without LiteRT).

    Raises RuntimeError when either is over MAX_ABS_DIFF; nothing is written then."""
    decoder = split_decoder(autoencoder, encoder)
    embeddings = np.asarray(encoder(x, training=False))
    pictures = np.asarray(decoder(embeddings, training=False))
    split_diff = float(np.max(np.abs(pictures - np.asarray(autoencoder(x, training=False)))))
    if split_diff > MAX_ABS_DIFF:
        raise RuntimeError(f"decoder(encoder(x)) differs from autoencoder(x) by {split_diff}")
    tflite = to_tflite(decoder)
    tflite_diff = check_tflite(tflite, decoder, embeddings)
    tmp = model_dir / f".{DECODER_TFLITE}.tmp-{os.getpid()}"
    try:
        tmp.write_bytes(tflite)
        tmp.chmod(0o644)
        os.replace(tmp, model_dir / DECODER_TFLITE)
    finally:
        tmp.unlink(missing_ok=True)
    return {"decoder_max_abs_diff": split_diff, "decoder_tflite_max_abs_diff": tflite_diff}


def export(model_dir: str | Path, x: np.ndarray | None = None) -> dict[str, Any]:
    """Adds `decoder.tflite` to a model directory from its `autoencoder.keras`; returns what it checked.

    `x`: float32 [N, 28, 28, 1] images for the checks (default: 64 digits of the shipped sample and 16
    of uniform noise). Raises FileNotFoundError for a missing file, ValueError when `encoder.keras` is
    not the model the card names, RuntimeError when a check fails."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    from encoder_service.model import model_version

    model_dir = Path(model_dir)
    card = read_card(model_dir)
    for name in (AUTOENCODER_KERAS, ENCODER_KERAS):
        if not (model_dir / name).is_file():
            raise FileNotFoundError(f"no {name} in model directory {model_dir}")
    autoencoder = keras.saving.load_model(model_dir / AUTOENCODER_KERAS, compile=False)
    encoder = keras.saving.load_model(model_dir / ENCODER_KERAS, compile=False)
    version = model_version(str(card.get("architecture", "")), encoder)
    if version != card["model_version"]:
        raise ValueError(
            f"{model_dir / ENCODER_KERAS} hashes to {version}, but the card names {card['model_version']}"
        )
    if x is None:
        x = _check_images()
    diffs = write_decoder(autoencoder, encoder, model_dir, x)
    return {"model_version": version, "bytes": (model_dir / DECODER_TFLITE).stat().st_size, **diffs}


def _check_images() -> np.ndarray:
    sample = Path(__file__).parent / "data" / "mnist-10k.npz"
    images = [np.random.default_rng(0).uniform(0, 1, (16, 28, 28)).astype(np.float32)]
    if sample.is_file():
        with np.load(sample) as data:
            images.append(data["x"][:64].astype(np.float32) / np.float32(255.0))
    return np.concatenate(images)[..., None]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m encoder_service.export",
        description="Add decoder.tflite (the autoencoder's decoder, for Reconstruct) to model directories "
        "trained before training wrote it. The encoder's files and the model version stay as they are.",
    )
    parser.add_argument("model_dirs", nargs="+", type=Path, metavar="MODEL_DIR")
    args = parser.parse_args(argv)
    failed = 0
    for model_dir in args.model_dirs:
        try:
            result = export(model_dir)
        except (OSError, ValueError, RuntimeError) as error:
            print(f"{model_dir}: {error}", file=sys.stderr)
            failed += 1
            continue
        print(
            f"{model_dir}: wrote {DECODER_TFLITE} ({result['bytes']:,} bytes), model version "
            f"{result['model_version']} (unchanged); "
            f"decoder(encoder(x)) vs autoencoder(x) max abs diff {result['decoder_max_abs_diff']:.3g}, "
            f"LiteRT vs Keras {result['decoder_tflite_max_abs_diff']}"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Input shapes other than 28x28x1: `--input-shape` parsing with clear refusals, and both architectures
built for colour and larger inputs, their reconstruction the input's shape (28x28x1 unchanged)."""

from __future__ import annotations

import pytest

from encoder_service.shapes import check_input_shape, parse_input_shape


@pytest.mark.parametrize(
    "text,shape",
    [
        ("28x28x1", (28, 28, 1)),
        ("32x32x3", (32, 32, 3)),
        (" 64X64x3 ", (64, 64, 3)),
        ("24x48x3", (24, 48, 3)),
    ],
)
def test_good_shapes_parse(text: str, shape: tuple[int, int, int]) -> None:
    assert parse_input_shape(text) == shape


@pytest.mark.parametrize(
    "text,message",
    [
        ("32x32", "expected HEIGHTxWIDTHxCHANNELS, e.g. 32x32x3"),
        ("32*32*3", "expected HEIGHTxWIDTHxCHANNELS"),
        ("-4x32x3", "expected HEIGHTxWIDTHxCHANNELS"),
        ("30x32x3", "input height 30: must be 8 to 256 pixels and a multiple of 4"),
        ("32x4x3", "input width 4: must be 8 to 256"),
        ("512x512x3", "input height 512"),
        ("32x32x4", "input channels 4: must be 1 (gray) or 3 (RGB)"),
        ("32x32x0", "input channels 0"),
    ],
)
def test_bad_shapes_get_a_clear_message(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as refused:
        parse_input_shape(text)
    assert str(refused.value).startswith(f"--input-shape {text!r}: ")
    with pytest.raises(ValueError):
        check_input_shape((30, 30, 3))


@pytest.mark.parametrize("architecture", ["wide", "tutorial"])
@pytest.mark.parametrize("shape", [(28, 28, 1), (32, 32, 3), (64, 64, 3), (24, 48, 1)])
def test_both_architectures_build_for_any_shape(architecture: str, shape: tuple[int, int, int]) -> None:
    import numpy as np

    from encoder_service.model import EMBEDDING_DIM, build_autoencoder

    autoencoder, encoder = build_autoencoder(architecture, shape)
    assert tuple(encoder.input_shape[1:]) == shape and tuple(encoder.output_shape[1:]) == (EMBEDDING_DIM,)
    assert tuple(autoencoder.output_shape[1:]) == shape
    x = np.random.default_rng(0).random((2, *shape)).astype(np.float32)
    assert autoencoder(x).shape == (2, *shape)


def test_the_digits_shape_builds_the_shipped_architecture_unchanged() -> None:
    import keras

    from encoder_service.model import build_autoencoder
    from encoder_service.model_dir import shipped_model

    shipped = keras.models.load_model(shipped_model("default") / "autoencoder.keras", compile=False)
    autoencoder, _ = build_autoencoder("wide")
    mine = {layer.name: [w.shape for w in layer.get_weights()] for layer in autoencoder.layers}
    theirs = {
        layer.name: [w.shape for w in layer.get_weights()] for layer in shipped.layers if layer.name in mine
    }
    assert mine == theirs

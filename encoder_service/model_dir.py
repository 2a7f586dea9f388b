"""The model directory: its file names, its card, the shipped models, and the LiteRT flatbuffer export.

Training, the export command and the runtimes all read or write the same directory, so its layout is
spelled here once. This module imports neither TensorFlow nor LiteRT until `to_tflite` or `check_tflite`
is called: the encoder service's image, which has no TensorFlow, imports it.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

AUTOENCODER_KERAS = "autoencoder.keras"  # the whole autoencoder: to resume, and the decoder's source
ENCODER_KERAS = "encoder.keras"  # served by the TensorFlow runtime
ENCODER_TFLITE = "encoder.tflite"  # served by the LiteRT runtime (the default)
DECODER_TFLITE = "decoder.tflite"  # written by training and by `python -m encoder_service.export`
CARD_JSON = "card.json"  # what was trained on what, and the model version
MODEL_FILES = (AUTOENCODER_KERAS, ENCODER_KERAS, ENCODER_TFLITE, DECODER_TFLITE, CARD_JSON)

MAX_ABS_DIFF = 1e-4  # a flatbuffer against its Keras model, and decoder(encoder(x)) against autoencoder(x)

SHIPPED_MODELS = Path(__file__).parent / "models"
DEFAULT_MODEL_DIR = SHIPPED_MODELS / "default"


def shipped_models() -> list[str]:
    """The names of the models shipped in encoder_service/models (`default`, `tutorial`, ...), sorted:
    the folders there that hold a card."""
    return sorted(p.name for p in SHIPPED_MODELS.iterdir() if (p / CARD_JSON).is_file())


def shipped_model(name: str) -> Path:
    """The directory of a model shipped in encoder_service/models by name (`--model NAME`).

    Raises ValueError naming the shipped models when there is none of that name."""
    known = shipped_models()
    if name not in known:
        raise ValueError(f"no shipped model {name!r}; shipped: {', '.join(known)}")
    return SHIPPED_MODELS / name


def read_card(model_dir: str | Path) -> dict[str, Any]:
    """The model directory's card.json as a dict; it must hold a `model_version`."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    path = model_dir / CARD_JSON
    if not path.is_file():
        raise FileNotFoundError(f"no {CARD_JSON} in model directory {model_dir} ({path})")
    try:
        card = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(card, dict) or not card.get("model_version"):
        raise ValueError(f"{path} has no model_version")
    return card


def to_tflite(model: Any) -> bytes:
    """A Keras model as a LiteRT flatbuffer, keeping Keras's dynamic batch dimension (the encoder's
    input is [-1, 28, 28, 1]). Imports TensorFlow."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    with contextlib.redirect_stdout(io.StringIO()):  # the converter prints its temporary SavedModel
        return bytes(converter.convert())


def check_tflite(tflite: bytes, model: Any, x: np.ndarray) -> float | None:
    """Max abs difference between the flatbuffer's and the Keras `model`'s outputs for `x`, so a bad
    conversion fails before it is written; None without LiteRT.

    Raises RuntimeError when it is over MAX_ABS_DIFF."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        return None
    interpreter = Interpreter(model_content=tflite)
    (inp,) = interpreter.get_input_details()
    (out,) = interpreter.get_output_details()
    interpreter.resize_tensor_input(inp["index"], list(x.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], np.ascontiguousarray(x, np.float32))
    interpreter.invoke()
    diff = float(np.max(np.abs(interpreter.get_tensor(out["index"]) - np.asarray(model(x)))))
    if diff > MAX_ABS_DIFF:
        raise RuntimeError(f"the LiteRT flatbuffer disagrees with the Keras {model.name} by {diff}")
    return diff

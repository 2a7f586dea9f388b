"""The serving runtimes: a model directory written by `encoder_service.train` turned into `embed(batch)`
and `reconstruct(batch)`.

- `LiteRTRuntime` runs `encoder.tflite` with LiteRT (`ai_edge_litert`), no TensorFlow needed: the default;
  it reconstructs with `decoder.tflite`.
- `TensorFlowRuntime` runs `encoder.keras` through a `tf.function` traced once for [None, 28, 28, 1]; it
  reconstructs with the decoder split from `autoencoder.keras` (`encoder_service.export.split_decoder`).

A model directory without its decoder still embeds; `reconstruct` then raises NoDecoderError
(`python -m encoder_service.export MODEL_DIR` adds `decoder.tflite` to a directory trained before it).

`novelty(batch, vectors)` runs the decoder on embeddings `embed` just made and scores each image's
reconstruction error against the card's `novelty` threshold (`encoder_service.novelty`): above 1, unlike
the training data. None without a decoder or without a threshold in the card (`has_novelty`).

Both read `card.json` for the model version and are safe to call from many threads at once. This module
imports neither LiteRT nor TensorFlow until a runtime of that kind is created.

    runtime = load_runtime(DEFAULT_MODEL_DIR)          # or load_runtime(path, "tensorflow")
    vectors = runtime.embed(images)                    # float32 [N, 28, 28] in [0, 1] -> float32 [N, 128]
    pictures = runtime.reconstruct(images)             # -> float32 [N, 28, 28] in [0, 1]: decoder(embed(x))
    scores = runtime.novelty(images, vectors)          # -> float32 [N], or None (no decoder or threshold)
"""

from __future__ import annotations

import os
import threading
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np

from encoder_service.model_dir import (
    AUTOENCODER_KERAS,
    DECODER_TFLITE,
    DEFAULT_MODEL_DIR,
    ENCODER_KERAS,
    ENCODER_TFLITE,
    read_card,
)
from encoder_service.novelty import Threshold

DEFAULT_MAX_CHUNK = 32  # images per LiteRT invoke: see LiteRTRuntime


class NoDecoderError(LookupError):
    """The model directory has no decoder, so the runtime cannot reconstruct (it still embeds)."""


class Runtime(ABC):
    """An encoder loaded from a model directory.

    Attributes: `name` ("litert" or "tensorflow"), `model_version` (the card's content hash),
    `dim` (embedding size, 128), `input_shape` ((28, 28, 1): height, width, channels),
    `card` (card.json as a dict), `model_dir`, `has_decoder` (whether `reconstruct` works),
    `novelty_threshold` (the card's, or None) and `has_novelty` (whether `novelty` scores)."""

    name: str
    model_version: str
    dim: int
    input_shape: tuple[int, int, int]
    card: dict[str, Any]
    model_dir: Path
    has_decoder: bool = False
    novelty_threshold: Threshold | None = None

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = Path(model_dir)
        self.card = read_card(self.model_dir)
        self.novelty_threshold = Threshold.from_card(self.card)
        self.model_version = str(self.card["model_version"])
        self.dim = int(self.card.get("embedding_dim", 128))
        height, width, channels = (int(v) for v in self.card.get("input_shape", (28, 28, 1)))
        self.input_shape = (height, width, channels)
        # How an image becomes this model's input: "digits" (the MNIST fit, preprocess.py) or "photo"
        # (colour kept, padded and resized: photo.py). Cards from before say nothing: digits.
        self.preprocess = str(self.card.get("preprocess", "digits"))

    def embed(self, batch: np.ndarray) -> np.ndarray:
        """Embeds float32 [N, H, W] (or [N, H, W, 1]) images in [0, 1]: returns C-contiguous float32 [N, dim].

        Raises ValueError for a batch of another shape. N = 0 gives a [0, dim] array."""
        x = self._as_input(batch)
        if len(x) == 0:
            return np.zeros((0, self.dim), np.float32)
        vectors = np.ascontiguousarray(self._embed(x), dtype=np.float32)
        if vectors.shape != (len(x), self.dim):
            raise RuntimeError(f"the model returned shape {vectors.shape}, expected {(len(x), self.dim)}")
        return vectors

    @abstractmethod
    def _embed(self, x: np.ndarray) -> np.ndarray:
        """Embeds a non-empty float32 C-contiguous [N, H, W, C] batch."""

    def reconstruct(self, batch: np.ndarray) -> np.ndarray:
        """The autoencoder's reconstructions of float32 [N, H, W] (or [N, H, W, 1]) images in [0, 1]: the
        decoder run on the embeddings `embed` gives. Returns C-contiguous float32 [N, H, W] in [0, 1].

        Raises NoDecoderError when the model directory has no decoder, ValueError for a batch of another
        shape. N = 0 gives a [0, H, W] array."""
        self.check_decoder()
        x = self._as_input(batch)
        height, width, channels = self.input_shape
        if len(x) == 0:
            return np.zeros((0, height, width), np.float32)
        pictures = np.asarray(self._reconstruct(x), dtype=np.float32)
        if pictures.shape != x.shape:
            raise RuntimeError(f"the decoder returned shape {pictures.shape}, expected {x.shape}")
        return np.ascontiguousarray(pictures.reshape(len(x), height, width) if channels == 1 else pictures)

    @property
    def has_novelty(self) -> bool:
        """Whether `novelty` scores: the model has a decoder and its card a novelty threshold."""
        return self.has_decoder and self.novelty_threshold is not None

    def novelty(self, batch: np.ndarray, vectors: np.ndarray) -> np.ndarray | None:
        """The novelty of each image of a batch (as `embed` takes it) from its embedding `vectors` (what
        `embed` gave for it): the decoder runs on the vectors, and the reconstruction error is scored
        against the card's threshold (encoder_service.novelty). float32 [N]; above 1, unlike the training
        data. None when the runtime has no decoder or the card no threshold."""
        threshold = self.novelty_threshold
        if threshold is None or not self.has_decoder:
            return None
        x = self._as_input(batch)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.shape != (len(x), self.dim):
            raise ValueError(
                f"{len(x)} images need vectors of shape {(len(x), self.dim)}, got {vectors.shape}"
            )
        if len(x) == 0:
            return np.zeros(0, np.float32)
        pictures = np.asarray(self._decode(vectors), dtype=np.float32)
        if pictures.shape != x.shape:
            raise RuntimeError(f"the decoder returned shape {pictures.shape}, expected {x.shape}")
        return threshold.novelty(x, pictures)

    def _decode(self, vectors: np.ndarray) -> np.ndarray:
        """The decoder's [N, H, W, C] output for non-empty float32 [N, dim] embeddings (only called with
        a decoder)."""
        raise NotImplementedError

    def check_decoder(self) -> None:
        """Raises NoDecoderError, saying how to add one, when this runtime cannot reconstruct."""
        if not self.has_decoder:
            raise NoDecoderError(self._no_decoder_message())

    def _reconstruct(self, x: np.ndarray) -> np.ndarray:
        """Reconstructs a non-empty float32 C-contiguous [N, H, W, C] batch (only called with a decoder)."""
        raise NotImplementedError

    def _no_decoder_message(self) -> str:
        return (
            f"model {self.model_dir} has no decoder ({DECODER_TFLITE}), so it cannot reconstruct; "
            f"add one with: python -m encoder_service.export {self.model_dir}"
        )

    def _as_input(self, batch: np.ndarray) -> np.ndarray:
        x = np.asarray(batch)
        height, width, channels = self.input_shape
        if x.ndim == 3 and channels == 1 and x.shape[1:] == (height, width):
            x = x[..., None]
        if x.ndim != 4 or x.shape[1:] != self.input_shape:
            raise ValueError(
                f"batch must be [N, {height}, {width}] or [N, {height}, {width}, {channels}], "
                f"got shape {x.shape}"
            )
        return np.ascontiguousarray(x, dtype=np.float32)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.model_dir)!r}, model_version={self.model_version!r})"


class LiteRTRuntime(Runtime):
    """Runs `encoder.tflite` with LiteRT. Each calling thread gets its own Interpreter (an Interpreter
    is not thread-safe); it is resized and reallocated only when that thread's batch size changes.

    `num_threads`: LiteRT's CPU threads per call (None: LiteRT's default, one thread). `max_chunk`: larger
    batches run in chunks of this many images. That bounds each thread's tensor arena (about 0.2 MB per
    image of the largest chunk it has seen), and it is faster: a chunk of 32 keeps the activations in the
    CPU's caches (on a 2-core AMD EPYC, 18,000 images/s against 12,000 for chunks of 64 or more; see
    bench/results/REPORT.md). Changing the batch size costs a resize of a few microseconds.

    `decoder.tflite`, when the directory has it, is loaded the same way (an Interpreter per thread) and
    run on each chunk's embeddings for `reconstruct`."""

    name = "litert"

    def __init__(
        self, model_dir: str | Path, *, num_threads: int | None = None, max_chunk: int = DEFAULT_MAX_CHUNK
    ) -> None:
        super().__init__(model_dir)
        if max_chunk < 1:
            raise ValueError(f"max_chunk must be at least 1, got {max_chunk}")
        self.max_chunk = max_chunk
        path = self.model_dir / ENCODER_TFLITE
        if not path.is_file():
            raise FileNotFoundError(f"no LiteRT model {ENCODER_TFLITE} in {self.model_dir} ({path})")
        from ai_edge_litert.interpreter import Interpreter

        self._interpreter_class = Interpreter
        self._model = path.read_bytes()
        self._num_threads = num_threads
        self._local = threading.local()
        state = self._state()  # load once here, so a bad file fails at startup and not on the first call
        details = state.interpreter.get_output_details()[0]
        if int(details["shape_signature"][-1]) != self.dim:
            raise ValueError(f"{path} outputs {details['shape_signature']}, the card says dim {self.dim}")
        decoder_path = self.model_dir / DECODER_TFLITE
        self._decoder = decoder_path.read_bytes() if decoder_path.is_file() else None
        self.has_decoder = self._decoder is not None
        if self._decoder is not None:  # as for the encoder: a bad file fails at startup
            decoder = self._decoder_state().interpreter
            takes = [int(v) for v in decoder.get_input_details()[0]["shape_signature"]]
            gives = [int(v) for v in decoder.get_output_details()[0]["shape_signature"]]
            if takes[1:] != [self.dim] or gives[1:] != list(self.input_shape):
                raise ValueError(
                    f"{decoder_path} maps {takes} to {gives}, expected [-1, {self.dim}] to "
                    f"[-1, {', '.join(str(v) for v in self.input_shape)}]"
                )

    def _state(self) -> _InterpreterState:
        return self._thread_state("state", self._model)

    def _decoder_state(self) -> _InterpreterState:
        assert self._decoder is not None
        return self._thread_state("decoder_state", self._decoder)

    def _thread_state(self, attribute: str, model: bytes) -> _InterpreterState:
        state: _InterpreterState | None = getattr(self._local, attribute, None)
        if state is None:
            interpreter = self._interpreter_class(model_content=model, num_threads=self._num_threads)
            state = _InterpreterState(interpreter)
            setattr(self._local, attribute, state)
        return state

    def _embed(self, x: np.ndarray) -> np.ndarray:
        if len(x) <= self.max_chunk:
            return self._invoke(x)
        out = np.empty((len(x), self.dim), np.float32)
        for start in range(0, len(x), self.max_chunk):
            out[start : start + self.max_chunk] = self._invoke(x[start : start + self.max_chunk])
        return out

    def _reconstruct(self, x: np.ndarray) -> np.ndarray:
        out = np.empty(x.shape, np.float32)
        for start in range(0, len(x), self.max_chunk):
            chunk = x[start : start + self.max_chunk]
            out[start : start + len(chunk)] = self._invoke(self._invoke(chunk), self._decoder_state())
        return out

    def _decode(self, vectors: np.ndarray) -> np.ndarray:
        out = np.empty((len(vectors), *self.input_shape), np.float32)
        state = self._decoder_state()
        for start in range(0, len(vectors), self.max_chunk):
            chunk = vectors[start : start + self.max_chunk]
            out[start : start + len(chunk)] = self._invoke(chunk, state)
        return out

    def _invoke(self, x: np.ndarray, state: _InterpreterState | None = None) -> np.ndarray:
        if state is None:
            state = self._state()
        interpreter = state.interpreter
        if state.batch_size != len(x):
            interpreter.resize_tensor_input(state.input_index, list(x.shape), strict=True)
            interpreter.allocate_tensors()
            state.batch_size = len(x)
        interpreter.set_tensor(state.input_index, x)
        interpreter.invoke()
        return np.array(interpreter.get_tensor(state.output_index))  # a copy: the buffer is reused


class _InterpreterState:
    """One thread's Interpreter and the batch size its tensors are allocated for."""

    def __init__(self, interpreter: Any) -> None:
        self.interpreter = interpreter
        self.input_index: int = interpreter.get_input_details()[0]["index"]
        self.output_index: int = interpreter.get_output_details()[0]["index"]
        self.batch_size = -1


class TensorFlowRuntime(Runtime):
    """Runs `encoder.keras` through a `tf.function` with input signature float32 [None, H, W, C]: traced
    once, never `Model.predict` per request. Needs TensorFlow (the `train` extra). Reconstructs with the
    decoder split from `autoencoder.keras` (`encoder_service.export.split_decoder`, as the flatbuffer's
    export does), when the directory has it, through a second `tf.function`."""

    name = "tensorflow"

    def __init__(self, model_dir: str | Path) -> None:
        super().__init__(model_dir)
        path = self.model_dir / ENCODER_KERAS
        if not path.is_file():
            raise FileNotFoundError(f"no Keras model {ENCODER_KERAS} in {self.model_dir} ({path})")
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import keras
        import tensorflow as tf

        self._model = keras.saving.load_model(path, compile=False)
        model = self._model

        @tf.function(input_signature=[tf.TensorSpec([None, *self.input_shape], tf.float32)])
        def encode(x: Any) -> Any:
            return model(x, training=False)

        self._encode = encode
        out = self._encode(tf.zeros([1, *self.input_shape], tf.float32))  # trace now, not on the first call
        if tuple(out.shape) != (1, self.dim):
            raise ValueError(f"{path} outputs shape {tuple(out.shape)[1:]}, the card says dim {self.dim}")
        autoencoder_path = self.model_dir / AUTOENCODER_KERAS
        self.has_decoder = autoencoder_path.is_file()
        if self.has_decoder:
            from encoder_service import model as _layers  # noqa: F401  (registers Unwhiten, CosineHead)
            from encoder_service.export import split_decoder

            autoencoder = keras.saving.load_model(autoencoder_path, compile=False)
            decoder = split_decoder(autoencoder, model)

            @tf.function(input_signature=[tf.TensorSpec([None, *self.input_shape], tf.float32)])
            def reconstruct(x: Any) -> Any:
                return decoder(model(x, training=False), training=False)

            @tf.function(input_signature=[tf.TensorSpec([None, self.dim], tf.float32)])
            def decode(vectors: Any) -> Any:
                return decoder(vectors, training=False)

            self._reconstruct_fn = reconstruct
            self._reconstruct_fn(tf.zeros([1, *self.input_shape], tf.float32))  # trace now
            self._decode_fn = decode
            self._decode_fn(tf.zeros([1, self.dim], tf.float32))

    def _embed(self, x: np.ndarray) -> np.ndarray:
        return self._encode(x).numpy()

    def _reconstruct(self, x: np.ndarray) -> np.ndarray:
        return self._reconstruct_fn(x).numpy()

    def _decode(self, vectors: np.ndarray) -> np.ndarray:
        return self._decode_fn(vectors).numpy()

    def _no_decoder_message(self) -> str:
        return (
            f"model {self.model_dir} has no {AUTOENCODER_KERAS}, which the tensorflow runtime takes the "
            "decoder from, so it cannot reconstruct"
        )


RUNTIMES: dict[str, type[Runtime]] = {"litert": LiteRTRuntime, "tensorflow": TensorFlowRuntime}


def load_runtime(model_dir: str | Path = DEFAULT_MODEL_DIR, name: str = "litert") -> Runtime:
    """The runtime `name` ("litert" or "tensorflow") for a model directory.

    Raises ValueError for an unknown name or a bad card, FileNotFoundError (naming the path) for a
    missing directory or file."""
    try:
        runtime_class = RUNTIMES[name]
    except KeyError:
        raise ValueError(f"unknown runtime {name!r}; known: {', '.join(RUNTIMES)}") from None
    return runtime_class(model_dir)

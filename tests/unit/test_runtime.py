"""The serving runtimes (`encoder_service.runtime`) on the shipped default model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from encoder_service.datasets import SAMPLE_PATH
from encoder_service.model_dir import DEFAULT_MODEL_DIR, read_card, shipped_model
from encoder_service.runtime import LiteRTRuntime, Runtime, TensorFlowRuntime, load_runtime
from tests.support import ROOT


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    """64 digits of the sample's test split, float32 [64, 28, 28] in [0, 1]."""
    with np.load(SAMPLE_PATH) as data:
        return data["x"][-64:].astype(np.float32) / 255.0


@pytest.fixture(scope="module")
def litert() -> Runtime:
    return load_runtime(DEFAULT_MODEL_DIR)


@pytest.fixture(scope="module")
def tensorflow() -> Runtime:
    return load_runtime(DEFAULT_MODEL_DIR, "tensorflow")


@pytest.fixture(scope="module", params=["litert", "tensorflow"])
def runtime(request: pytest.FixtureRequest) -> Runtime:
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize(
    ("name", "dataset", "architecture"),
    [
        ("default", "mnist-sample", "wide"),
        ("tutorial", "mnist-sample", "tutorial"),
        ("fashion", "fashion_mnist", "wide"),
        ("fashion-tutorial", "fashion_mnist", "tutorial"),
    ],
)
def test_shipped_models(name: str, dataset: str, architecture: str) -> None:
    """Each shipped model is small, trained on its data set's index split only, and its card records
    its retrieval figures (the default ones meet the targets: P@10 0.98 on digits, 0.90 on clothes)."""
    model_dir = shipped_model(name)
    for file in ("autoencoder.keras", "encoder.keras", "encoder.tflite", "card.json"):
        size = (model_dir / file).stat().st_size
        assert 0 < size < 3_000_000, (file, size)
    card = read_card(model_dir)
    assert (card["dataset"], card["architecture"]) == (dataset, architecture)
    assert card["train_size"] + card["validation_size"] == (8000 if dataset == "mnist-sample" else 60000)
    assert card["model_version"].startswith(f"{architecture}-")
    repo = str(ROOT)
    assert repo not in card["dataset_source"], "no build machine's checkout path in a shipped card"
    retrieval = card["retrieval"]
    assert retrieval["index"] == "the training split" and retrieval["queries"] == "the test split"
    if architecture == "wide":
        assert retrieval["p_at_k"] >= (0.98 if dataset == "mnist-sample" else 0.90)
        assert card["training_seconds"] < 600


def test_attributes(litert: Runtime, tensorflow: Runtime) -> None:
    assert isinstance(litert, LiteRTRuntime) and litert.name == "litert"
    assert isinstance(tensorflow, TensorFlowRuntime) and tensorflow.name == "tensorflow"
    card = json.loads((DEFAULT_MODEL_DIR / "card.json").read_text())
    for rt in (litert, tensorflow):
        assert rt.model_version == card["model_version"]
        assert rt.card == card
        assert rt.dim == 128
        assert rt.input_shape == (28, 28, 1)


def test_runtimes_agree(litert: Runtime, tensorflow: Runtime, digits: np.ndarray) -> None:
    a, b = litert.embed(digits), tensorflow.embed(digits)
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    assert np.abs(a).max() > 0.1, "not all zeros"


@pytest.mark.parametrize("size", [1, 7, 64, 0])
def test_batch_sizes(runtime: Runtime, digits: np.ndarray, size: int) -> None:
    vectors = runtime.embed(digits[:size])
    assert vectors.shape == (size, 128)
    assert vectors.dtype == np.float32 and vectors.flags.c_contiguous
    if size:
        # The same image gives the same vector whatever batch it is in, with or without a channel axis.
        np.testing.assert_allclose(vectors, runtime.embed(digits)[:size], atol=1e-5, rtol=0)
        np.testing.assert_allclose(vectors, runtime.embed(digits[:size, :, :, None]), atol=1e-6, rtol=0)


def test_litert_chunks_large_batches(digits: np.ndarray) -> None:
    chunked = LiteRTRuntime(DEFAULT_MODEL_DIR, max_chunk=5)
    whole = LiteRTRuntime(DEFAULT_MODEL_DIR, max_chunk=64)
    for size in (5, 6, 23, 64):
        vectors = chunked.embed(digits[:size])
        assert vectors.shape == (size, 128) and vectors.flags.c_contiguous
        np.testing.assert_allclose(vectors, whole.embed(digits[:size]), atol=1e-5, rtol=0)


def test_bad_shapes_are_refused(runtime: Runtime) -> None:
    for shape in [(28, 28), (2, 28, 27), (2, 28, 28, 3), (2, 784)]:
        with pytest.raises(ValueError, match=r"batch must be \[N, 28, 28\]"):
            runtime.embed(np.zeros(shape, np.float32))


def test_concurrent_calls_match_serial(runtime: Runtime, digits: np.ndarray) -> None:
    # Each task is (start, size): threads keep changing batch sizes, which reallocates their tensors.
    tasks = [(i % 50, 1 + (i * 7) % 14) for i in range(96)]
    serial = [runtime.embed(digits[start : start + size]) for start, size in tasks]
    with ThreadPoolExecutor(max_workers=8) as pool:
        concurrent = list(pool.map(lambda t: runtime.embed(digits[t[0] : t[0] + t[1]]), tasks))
    for expected, got in zip(serial, concurrent, strict=True):
        np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)


def test_version_is_the_weight_hash_of_encoder_keras() -> None:
    import keras

    from encoder_service.model import model_version

    card = read_card(DEFAULT_MODEL_DIR)
    encoder = keras.saving.load_model(DEFAULT_MODEL_DIR / "encoder.keras", compile=False)
    assert model_version(card["architecture"], encoder) == card["model_version"]


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown runtime 'onnx'; known: litert, tensorflow"):
        load_runtime(DEFAULT_MODEL_DIR, "onnx")
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        load_runtime(tmp_path / "does-not-exist")
    with pytest.raises(FileNotFoundError, match=r"no card\.json"):
        load_runtime(tmp_path)
    shutil.copy(DEFAULT_MODEL_DIR / "card.json", tmp_path / "card.json")
    with pytest.raises(FileNotFoundError, match=r"encoder\.tflite"):
        load_runtime(tmp_path, "litert")
    with pytest.raises(FileNotFoundError, match=r"encoder\.keras"):
        load_runtime(tmp_path, "tensorflow")
    (tmp_path / "card.json").write_text("{}")
    with pytest.raises(ValueError, match="no model_version"):
        load_runtime(tmp_path)


def test_litert_serving_needs_no_tensorflow() -> None:
    code = (
        "import sys, numpy as np\n"
        "from encoder_service.runtime import load_runtime\n"
        "v = load_runtime(sys.argv[1]).embed(np.zeros((3, 28, 28), np.float32))\n"
        "assert v.shape == (3, 128), v.shape\n"
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code, str(DEFAULT_MODEL_DIR)], check=True, timeout=60)

"""The retrieval-quality harness (`make eval`): baselines, perturbations, report, service vs in process."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from encoder_service.datasets import SAMPLE_PATH
from encoder_service.preprocess import decode_image
from imgsearch.evaluate import nearest_labels
from tools import quality


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    with np.load(SAMPLE_PATH) as data:
        return np.asarray(data["x"][:40])


def test_pca_projects_on_the_leading_components(digits: np.ndarray) -> None:
    x = digits.astype(np.float32) / 255
    pca = quality.Pca(x, dims=8)
    projected = pca(x)
    assert projected.shape == (40, 8) and projected.dtype == np.float32
    variances = projected.var(axis=0)
    assert np.all(np.diff(variances) <= 1e-5), "components come in order of variance"
    assert np.allclose(projected.mean(axis=0), 0.0, atol=1e-4), "centred on the fitted mean"


@pytest.mark.parametrize("name", list(quality.PERTURBATIONS))
def test_perturbations_stay_usable_digits(digits: np.ndarray, name: str) -> None:
    pngs = quality.encode_queries(digits[:5], name)
    inputs = np.stack([decode_image(data) for data in pngs])
    assert inputs.shape == (5, 28, 28)
    original = digits[:5].astype(np.float32) / 255
    difference = float(np.abs(inputs - original).mean())
    if name == "original":
        assert difference == 0.0, "a PNG round trip changes nothing"
    else:
        assert 0.005 < difference < 0.5, f"{name} changes the digit, and leaves a digit ({difference})"
        assert inputs.max() > 0.5, "ink stays ink, also from dark-on-white canvases"


def test_nearest_labels_is_exact_l2() -> None:
    rng = np.random.default_rng(0)
    vectors = rng.random((50, 6)).astype(np.float32)
    queries = rng.random((7, 6)).astype(np.float32)
    labels = [f"l{n}" for n in range(50)]
    distances = ((queries[:, None, :] - vectors[None, :, :]) ** 2).sum(axis=2)
    expected = [[labels[n] for n in np.argsort(row, kind="stable")[:3]] for row in distances]
    assert nearest_labels(vectors, labels, queries, 3) == expected


def test_a_small_run_through_the_services(tmp_path: Path) -> None:
    """Every embedding measured through real services on 300 + 300 digits; the report's files and the
    agreement of the models' figures with the in-process fast path."""
    output = tmp_path / "report"
    assert quality.main(["--datasets", "mnist-sample", "--limit", "300", "--output", str(output)]) == 0
    rows = json.loads((output / "eval.json").read_text())
    assert [row["embedding"] for row in rows] == ["raw", "pca", "tutorial", "default"]
    assert [row["dim"] for row in rows] == [784, 128, 128, 128]
    for row in rows:
        assert set(row["quality"]) == set(quality.PERTURBATIONS), row["embedding"]
        original = row["quality"]["original"]
        assert original["queries"] == 300 and original["k"] == 10
        assert 0.3 < original["p_at_k"] <= 1.0
        assert set(original["per_class"]) == {str(d) for d in range(10)}
    models = [row for row in rows if row["model_version"]]
    assert {row["model_version"].split("-")[0] for row in models} == {"tutorial", "wide"}
    assert all(row["in_process_max_diff"] < 1e-4 for row in models)
    report = (output / "EVAL.md").read_text()
    assert "| MNIST sample (8,000 / 2,000) | raw | 784 |" in report
    assert "## Robustness" in report and "## Per class" in report
    assert (output / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_dataset_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        quality.main(["--datasets", "cifar", "--output", str(tmp_path)])
    assert "no known dataset in 'cifar'" in capsys.readouterr().err

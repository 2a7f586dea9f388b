"""The retrieval-quality harness (`make eval`): baselines, perturbations, report, service vs in process."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from encoder_service.datasets import SAMPLE_PATH, load_icons
from encoder_service.duplicate_distance import decoder_for
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


def test_icon_pixels_through_the_photo_preprocessing_are_the_icons() -> None:
    """The icons' `raw` baseline: a 32x32 RGB icon as a PNG through decode_photo at 32x32x3 is its own
    3,072 pixel values / 255 (and through the digits preprocessing a 28x28 gray image)."""
    icons = load_icons().x_test[:6]
    pngs = quality.encode_queries(icons, "original")
    photo = quality.preprocess(pngs, decoder_for("photo", (32, 32, 3)))
    assert photo.shape == (6, 32, 32, 3) and photo.dtype == np.float32
    assert np.allclose(photo, icons.astype(np.float32) / 255, atol=1e-6)
    assert quality.raw_pixels(photo).shape == (6, 3072)
    assert quality.preprocess(pngs).shape == (6, 28, 28), "the default is the digits preprocessing"


def test_chance_levels_of_an_imbalanced_split() -> None:
    index = ["a"] * 6 + ["b"] * 3 + ["c"]
    queries = ["a", "a", "b", "c"]
    chance = quality.chance_levels(index, queries)
    assert chance["p_at_k"] == pytest.approx(0.5 * 0.6 + 0.25 * 0.3 + 0.25 * 0.1)
    assert chance["mean_per_class_p_at_k"] == pytest.approx((0.6 + 0.3 + 0.1) / 3)


def test_the_icons_suite_through_the_services(tmp_path: Path) -> None:
    """The colour suite alone on 80 + 80 icons: raw RGB pixels, PCA, the digits default model and the two
    colour models through real services, each model's in-process check decoded with its own preprocessing;
    no perturbations; the mean per-class P@10 and the chance level in the report."""
    output = tmp_path / "report"
    assert quality.main(["--datasets", "icons", "--limit", "80", "--output", str(output)]) == 0
    rows = json.loads((output / "eval.json").read_text())
    assert [row["embedding"] for row in rows] == ["raw", "pca", "default", "icons", "icons-ssl"]
    assert [row["dim"] for row in rows] == [3072, 128, 128, 128, 128]
    for row in rows:
        assert set(row["quality"]) == {"original"}, "the digits' perturbations are not sent"
        original = row["quality"]["original"]
        assert original["queries"] == 80 and original["k"] == 10
        assert 0.0 < original["p_at_k"] <= 1.0 and 0.0 < original["mean_per_class_p_at_k"] <= 1.0
        assert 0.0 < row["chance"]["p_at_k"] < 1.0 and 0.0 < row["chance"]["mean_per_class_p_at_k"] < 1.0
    models = rows[2:]
    assert all(row["model_version"] for row in models)
    assert all(row["in_process_max_diff"] < 1e-4 for row in models)
    report = (output / "EVAL.md").read_text()
    assert "| Oxygen icons, colour (1,026 / 257) | raw | 3072 |" in report
    assert "mean per-class P@10" in report and "chance P@10" in report and "mean over classes" in report
    assert "## Robustness" not in report
    assert (output / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_missing_model_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no model default, icons, icons-ssl in .*make models"):
        quality.main(["--datasets", "icons", "--models-dir", str(tmp_path), "--output", str(tmp_path)])


def test_unknown_dataset_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        quality.main(["--datasets", "cifar", "--output", str(tmp_path)])
    assert "no known dataset in 'cifar'" in capsys.readouterr().err

"""Novelty (encoder_service/novelty.py): how unlike its training data an image looks to a model, from the
autoencoder's reconstruction error. In-domain images score low and out-of-domain images high for the
shipped models, through the real service; the default model separates Fashion-MNIST from the MNIST query
split (AUROC, the share of digits flagged); Embed's `novelty` (skipped on request, absent without a
decoder or a threshold, the same under micro-batching); the CLI's warning, `search --json`'s field and the
index summary's count; the web reply's notice and the results' novelty."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from encoder_service.duplicate_distance import FASHION_SAMPLE
from encoder_service.model_dir import CARD_JSON, DECODER_TFLITE, ENCODER_TFLITE, shipped_model
from encoder_service.novelty import CARD_KEY, MEASURES, Threshold, auroc, errors, model_input
from encoder_service.runtime import load_runtime
from encoder_service.service import EncoderService
from imgsearch.cli import main
from imgsearch.client import EncoderClient, ImageSearch
from imgsearch.ingest import NOVELTY_KEY, collect_images, index_images
from index_service.service import IndexService
from tests.support import Gateway, address, mnist_sample, png, request, serve, start_encoder, start_index
from web.settings import Settings

QUERY_SPLIT = 8000  # the MNIST sample's query split: images 8,000-9,999, never trained on
SERVICE_IMAGES = 100  # of each kind, through the service
IN_PROCESS_IMAGES = 1000  # of each kind, in process through the runtime, for the AUROC


def fashion_sample(count: int, start: int = 0) -> np.ndarray:
    """Fashion-MNIST test images (the shipped sample), uint8 [count, 28, 28]."""
    with np.load(FASHION_SAMPLE) as data:
        return np.asarray(data["x"][start : start + count])


# Fashion-MNIST's tops, coats and bags: what the digit model flags 99% of the time (its sandals, sneakers
# and dresses, thin shapes, 61-77%)
BROAD_CLOTHES = (0, 2, 4, 6, 8)


def broad_clothes(count: int, start: int = 0) -> list[np.ndarray]:
    with np.load(FASHION_SAMPLE) as data:
        x, y = data["x"][start:], data["y"][start:]
    return list(x[np.isin(y, BROAD_CLOTHES)][:count])


def query_digits(count: int, start: int = 0) -> np.ndarray:
    return mnist_sample(count, QUERY_SPLIT + start)[0]


def encoded(image: Image.Image, format_name: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format_name)
    return buffer.getvalue()


def noise(seed: int, size: int = 64) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    return encoded(Image.fromarray(pixels, "L"))


def grey(level: int, size: int = 64) -> bytes:
    return encoded(Image.new("L", (size, size), level))


def photo(seed: int) -> bytes:
    """A photo-like RGB JPEG: a sky gradient, a sun, a house, grass, sensor noise."""
    rng = np.random.default_rng(seed)
    height, width = 96, 128
    rows, columns = np.mgrid[0:height, 0:width]
    image = np.zeros((height, width, 3))
    image[..., 0], image[..., 1], image[..., 2] = 80 + rows, 120 + rows * 0.8, 230 - rows * 0.5
    image[rows > 60] = [60, 140, 50]
    x, y = rng.integers(20, 100), rng.integers(10, 40)
    image[(columns - x) ** 2 + (rows - y) ** 2 < 100] = [250, 220, 60]
    left = rng.integers(10, 80)
    image[40:75, left : left + 30] = [150, 60, 40]
    image += rng.normal(0, 8, image.shape)
    return encoded(Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), "RGB"), "JPEG")


ODD_IMAGES: dict[str, Callable[[], list[bytes]]] = {
    "random noise": lambda: [noise(seed) for seed in range(3)] + [noise(9, size=28)],
    "a flat grey image": lambda: [grey(level) for level in (60, 128, 200)] + [grey(128, size=28)],
    "a photo-like RGB image": lambda: [photo(seed) for seed in range(3)],
}


@pytest.fixture(scope="module")
def encoder() -> Iterator[EncoderService]:
    yield from serve(start_encoder("--models", "default,fashion"))


@pytest.fixture(scope="module")
def client(encoder: EncoderService) -> Iterator[EncoderClient]:
    with closing(EncoderClient(address(encoder), timeout_s=60)) as made:
        yield made


def novelty_of(client: EncoderClient, images: list[bytes], model: str = "") -> np.ndarray:
    found = client.embed(images, model)
    assert found.novelty is not None and len(found.novelty) == len(images)
    return np.array(found.novelty)


# ---- in-domain low, out-of-domain high, through the service


@pytest.mark.parametrize(
    ("model", "inside", "outside"),
    [("default", query_digits, fashion_sample), ("fashion", fashion_sample, query_digits)],
    ids=["default: digits in, clothes out", "fashion: clothes in, digits out"],
)
def test_in_domain_scores_low_and_out_of_domain_high(
    client: EncoderClient,
    model: str,
    inside: Callable[[int], np.ndarray],
    outside: Callable[[int], np.ndarray],
) -> None:
    ours = novelty_of(client, [png(image) for image in inside(SERVICE_IMAGES)], model)
    theirs = novelty_of(client, [png(image) for image in outside(SERVICE_IMAGES)], model)
    assert np.median(ours) < 0.8 and np.mean(ours > 1) <= 0.05, (np.median(ours), np.mean(ours > 1))
    assert np.median(theirs) > 1.2 and np.mean(theirs > 1) >= 0.8, (np.median(theirs), np.mean(theirs > 1))


@pytest.mark.parametrize("kind", list(ODD_IMAGES))
def test_odd_images_score_high_with_the_digit_model(client: EncoderClient, kind: str) -> None:
    scores = novelty_of(client, ODD_IMAGES[kind]())
    assert scores.min() > 1.1, scores


def test_the_clothes_model_cannot_see_blobs_as_novel(client: EncoderClient) -> None:
    """A known limit, pinned so that a change to it is seen: the preprocessing fits a noise patch, a flat
    grey square or a photo into a 20 x 20 box, which the clothes model redraws as well as a bag; only a
    full 28 x 28 frame of noise reads as novel. A blank image reads as nothing new to any model."""
    blobs = [noise(0), grey(128), photo(0)]
    assert novelty_of(client, blobs, "fashion").max() < 1
    assert novelty_of(client, [noise(9, size=28)], "fashion")[0] > 1
    blank = encoded(Image.new("L", (28, 28), 0))
    assert novelty_of(client, [blank])[0] < 0.1 and novelty_of(client, [blank], "fashion")[0] < 0.1


# ---- the targets, in process (1,000 + 1,000 images through the runtime)


@pytest.mark.parametrize(
    ("model", "inside", "outside", "least_auroc"),
    [("default", query_digits, fashion_sample, 0.95), ("fashion", fashion_sample, query_digits, 0.95)],
)
def test_separation_and_the_share_flagged(
    model: str,
    inside: Callable[[int], np.ndarray],
    outside: Callable[[int], np.ndarray],
    least_auroc: float,
) -> None:
    """The default model: Fashion-MNIST test images against MNIST query-split digits, AUROC >= 0.95 and at
    most 5% of the digits flagged (measured: 0.985 and 1.9% on 2,000 + 3,000 by python -m tools.novelty);
    the fashion model the other way round."""
    runtime = load_runtime(shipped_model(model))
    scores = []
    for images in (inside(IN_PROCESS_IMAGES), outside(IN_PROCESS_IMAGES)):
        x = model_input(images)
        found = runtime.novelty(x, runtime.embed(x))
        assert found is not None
        scores.append(found)
    ours, theirs = scores
    separation = auroc(ours, theirs)
    assert separation >= least_auroc, separation
    assert np.mean(ours > 1) <= 0.05, np.mean(ours > 1)
    assert np.mean(theirs > 1) >= 0.8, np.mean(theirs > 1)


def test_the_decoder_on_the_embeddings_is_the_reconstruction() -> None:
    runtime = load_runtime(shipped_model("default"))
    x = model_input(query_digits(40))
    threshold = runtime.novelty_threshold
    assert threshold is not None
    via_reconstruct = threshold.novelty(x, runtime.reconstruct(x))
    via_decoder = runtime.novelty(x, runtime.embed(x))
    assert via_decoder is not None and np.allclose(via_decoder, via_reconstruct, rtol=1e-5)
    empty = runtime.novelty(x[:0], runtime.embed(x[:0]))
    assert empty is not None and empty.shape == (0,)
    with pytest.raises(ValueError, match="vectors of shape"):
        runtime.novelty(x, runtime.embed(x[:3]))


@pytest.mark.parametrize("name", ["default", "tutorial", "fashion", "fashion-tutorial"])
def test_every_shipped_card_records_its_threshold(name: str) -> None:
    card = json.loads((shipped_model(name) / CARD_JSON).read_text())
    entry = card[CARD_KEY]
    assert card["model_version"] and Threshold.from_card(card) is not None
    assert entry["count"] >= 800 and "validation split" in entry["data"]
    assert set(entry["measures"]) == set(MEASURES)
    assert all(list(p) == ["p50", "p90", "p95", "p99", "p99.9"] for p in entry["measures"].values())
    assert entry["threshold"] == pytest.approx(entry["error"]["p99"], rel=1e-3)
    assert entry["test"]["above_1"] <= 0.05 and entry["outside"]["above_1"] >= 0.8
    assert entry["outside"]["auroc_against_test"] >= 0.95


def test_a_card_without_a_usable_threshold_gives_none() -> None:
    good = json.loads((shipped_model("default") / CARD_JSON).read_text())
    assert Threshold.from_card({}) is None
    assert Threshold.from_card({CARD_KEY: "high"}) is None
    assert Threshold.from_card({CARD_KEY: {**good[CARD_KEY], "threshold": 0}}) is None
    assert Threshold.from_card({CARD_KEY: {**good[CARD_KEY], "threshold": True}}) is None
    assert Threshold.from_card({CARD_KEY: {**good[CARD_KEY], "scale": {"bce": 1.0}}}) is None
    with pytest.raises(ValueError, match="differ in shape"):
        errors(np.zeros((2, 28, 28)), np.zeros((2, 28, 27)))


# ---- Embed's novelty: on request, per model, under micro-batching, in Info


def test_embed_skips_novelty_on_request(client: EncoderClient) -> None:
    images = [png(image) for image in query_digits(5)]
    skipped = client.embed(images, novelty=False)
    scored = client.embed(images)
    assert skipped.novelty is None and scored.novelty is not None and len(scored.novelty) == 5
    assert np.array_equal(skipped.vectors, scored.vectors)


def test_no_novelty_without_a_decoder_or_a_threshold(tmp_path: Path) -> None:
    default = shipped_model("default")
    card = json.loads((default / CARD_JSON).read_text())
    no_decoder = tmp_path / "no-decoder"
    no_threshold = tmp_path / "no-threshold"
    for folder, files, written in (
        (no_decoder, [ENCODER_TFLITE], card),
        (no_threshold, [ENCODER_TFLITE, DECODER_TFLITE], {k: v for k, v in card.items() if k != CARD_KEY}),
    ):
        folder.mkdir()
        for name in files:
            shutil.copy(default / name, folder / name)
        (folder / CARD_JSON).write_text(json.dumps(written))
    models = f"default,no-decoder={no_decoder},no-threshold={no_threshold}"
    with serve_encoder("--models", models) as service, closing(EncoderClient(address(service))) as made:
        images = [png(image) for image in fashion_sample(3)]
        assert made.embed(images).novelty is not None
        assert made.embed(images, "no-decoder").novelty is None
        assert made.embed(images, "no-threshold").novelty is None
        info = made.info()
        assert [bool(m["card"].get(CARD_KEY)) for m in info["models"]] == [True, True, False]


@contextmanager
def serve_encoder(*flags: str) -> Iterator[EncoderService]:
    service = start_encoder(*flags)
    try:
        yield service
    finally:
        service.stop(0)


def test_micro_batching_gives_each_call_its_own_novelty(client: EncoderClient) -> None:
    calls = [
        [png(image) for image in query_digits(count, start)] + [png(f) for f in fashion_sample(count, start)]
        for count, start in ((1, 0), (7, 10), (20, 40), (3, 90))
    ]
    alone = [novelty_of(client, images) for images in calls]
    with (
        serve_encoder("--batch-window-ms", "50") as batched,
        closing(EncoderClient(address(batched))) as made,
        ThreadPoolExecutor(len(calls)) as pool,
    ):
        together = list(pool.map(lambda images: novelty_of(made, images), calls))
    for one, other in zip(alone, together, strict=True):
        assert np.allclose(one, other, rtol=1e-4, atol=1e-5)


def test_info_carries_the_novelty_record(client: EncoderClient) -> None:
    info = client.info()
    for entry in info["models"]:
        recorded = entry["card"][CARD_KEY]
        assert recorded["threshold"] > 0 and recorded["data"] and recorded["count"] > 0


# ---- the CLI: the warning, search --json's novelty, the index summary's count and the metadata


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """mixed/digits/<n>.png (12 query digits) and mixed/clothes/<n>.png (6 Fashion-MNIST tops, coats and
    bags); one query of each kind."""
    root = tmp_path_factory.mktemp("novel")
    for kind, images in (("digits", list(query_digits(12))), ("clothes", broad_clothes(6))):
        (root / "mixed" / kind).mkdir(parents=True)
        for n, image in enumerate(images):
            Image.fromarray(image).save(root / "mixed" / kind / f"{n:02d}.png")
    (root / "queries").mkdir()
    Image.fromarray(query_digits(1, 100)[0]).save(root / "queries" / "digit.png")
    Image.fromarray(broad_clothes(1, 100)[0]).save(root / "queries" / "coat.png")
    return {
        "mixed": root / "mixed",
        "digit": root / "queries" / "digit.png",
        "coat": root / "queries" / "coat.png",
    }


@pytest.fixture
def index(tmp_path: Path) -> Iterator[IndexService]:
    yield from serve(start_index(tmp_path / "index"))


def run_cli(
    capsys: pytest.CaptureFixture[str], encoder: EncoderService, index: IndexService, *args: str
) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["--encoder", address(encoder), "--index", address(index), *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_index_counts_the_novel_items_and_stores_each_ones_novelty(
    capsys: pytest.CaptureFixture[str],
    encoder: EncoderService,
    client: EncoderClient,
    index: IndexService,
    folders: dict[str, Path],
) -> None:
    files, _ = collect_images([folders["mixed"]])
    expected = dict(
        zip((f.id for f in files), novelty_of(client, [f.path.read_bytes() for f in files]), strict=True)
    )
    novel = sum(value > 1 for value in expected.values())
    assert sum(expected[f"clothes/{n:02d}.png"] > 1 for n in range(6)) >= 5  # clothes look novel to digits
    code, out, err = run_cli(capsys, encoder, index, "index", str(folders["mixed"]), "--no-progress")
    assert code == 0, err
    assert "indexed 18 images; the index now holds 18\n" in out
    looks = "looks" if novel == 1 else "look"
    assert f"\n{novel} of them {looks} unlike the model's training data (novelty > 1;" in out, out
    code, out, _ = run_cli(capsys, encoder, index, "list", "--json")
    stored = {item["id"]: item["metadata"] for item in map(json.loads, out.splitlines())}
    assert {key: float(m[NOVELTY_KEY]) for key, m in stored.items()} == pytest.approx(expected, abs=0.006)
    assert all(m[NOVELTY_KEY] == f"{float(m[NOVELTY_KEY]):.2f}" for m in stored.values())


def test_search_warns_of_a_novel_query_and_gives_its_novelty(
    capsys: pytest.CaptureFixture[str], encoder: EncoderService, index: IndexService, folders: dict[str, Path]
) -> None:
    code, _, err = run_cli(capsys, encoder, index, "index", str(folders["mixed"]), "--no-progress")
    assert code == 0, err
    coat, digit = str(folders["coat"]), str(folders["digit"])
    code, out, err = run_cli(capsys, encoder, index, "search", coat, digit, "-k", "3", "--json")
    assert code == 0, err
    rows = {row["query"]: row for row in map(json.loads, out.splitlines())}
    assert rows[coat]["novelty"] > 1 and 0 <= rows[digit]["novelty"] < 1
    assert all(isinstance(row["novelty"], float) and len(row["results"]) == 3 for row in rows.values())
    warned = [line for line in err.splitlines() if "warning" in line]
    assert warned == [
        f"imgsearch: warning: {coat} looks unlike what the model 'default' was trained on (novelty "
        f"{rows[coat]['novelty']:.1f}; trained on mnist-sample): its results may mean little"
    ]
    code, out, err = run_cli(capsys, encoder, index, "search", coat, digit, "-k", "3")  # the table too
    assert code == 0 and f"imgsearch: warning: {coat} looks unlike" in err and digit not in err
    code, out, err = run_cli(capsys, encoder, index, "search", "--id", "clothes/00.png", "-k", "2", "--json")
    assert code == 0 and json.loads(out)["novelty"] is None and "warning" not in err


# ---- the web gateway: the query's notice, each result's novelty


def upload(url: str, image: bytes) -> dict[str, Any]:
    reply = request(f"{url}/api/search", fields={"k": "18"}, files={"file": ("q.png", image, "image/png")})
    assert reply.status == 200, reply.body
    found: dict[str, Any] = reply.json()
    return found


def test_the_web_reply_says_when_the_query_is_novel(
    encoder: EncoderService, index: IndexService, folders: dict[str, Path]
) -> None:
    with closing(ImageSearch(address(encoder), address(index), 30)) as search:
        report = index_images(search, collect_images([folders["mixed"]])[0])
        stored, _ = search.index.get([f"clothes/{n:02d}.png" for n in range(6)])
    assert report.novel >= 5 and report.scored == 18
    settings = Settings(encoder=address(encoder), index=address(index))
    with Gateway(settings) as gateway:
        coat = upload(gateway.url, folders["coat"].read_bytes())
        digit = upload(gateway.url, folders["digit"].read_bytes())
        by_id = request(f"{gateway.url}/api/search?id=clothes/00.png&k=3").json()
        page = request(f"{gateway.url}/").body.decode()
    assert coat["novel"] is True and coat["novelty"] > 1
    assert coat["novelty_notice"] == (
        f"The image looks unlike what the model 'default' was trained on (novelty {coat['novelty']:.1f}; "
        "trained on mnist-sample): its results may mean little"
    )
    assert digit["novel"] is False and digit["novelty"] < 1 and digit["novelty_notice"] is None
    novelty = {r["id"]: r["novelty"] for r in coat["results"]}
    assert novelty == {r["id"]: float(r["metadata"][NOVELTY_KEY]) for r in coat["results"]}
    assert sum(value > 1 for value in novelty.values()) == report.novel
    expected = float(next(item for item in stored if item.id == "clothes/00.png").metadata[NOVELTY_KEY])
    assert by_id["novelty"] == expected and by_id["novel"] is (expected > 1)
    assert 'id="query-novelty"' in page


def chromium() -> str | None:
    for candidate in (
        os.environ.get("IMGSEARCH_CHROMIUM", ""),
        "/usr/bin/chromium",
        "/usr/bin/chromium-browser",
    ):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.mark.skipif(
    chromium() is None or importlib.util.find_spec("playwright") is None,
    reason="needs a chromium executable and Playwright for Python (`make setup`)",
)
def test_the_page_shows_the_notice_and_the_badges(
    encoder: EncoderService, index: IndexService, folders: dict[str, Path]
) -> None:
    """In a real browser (a few seconds): the notice on a novel query, none on a digit, and a badge on each
    novel result, as text."""
    from playwright.sync_api import expect, sync_playwright

    with closing(ImageSearch(address(encoder), address(index), 30)) as search:
        report = index_images(search, collect_images([folders["mixed"]])[0])
    settings = Settings(encoder=address(encoder), index=address(index))
    errors: list[str] = []
    with Gateway(settings) as gateway, sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium(), args=["--no-sandbox"] if os.geteuid() == 0 else []
        )
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 760})
            page.set_default_timeout(15000)
            expect.set_options(timeout=15000)
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(gateway.url)
            expect(page.locator("body")).to_have_attribute("data-ready", "1")
            page.select_option("#k", "20")
            notice = page.locator("#query-novelty")
            page.set_input_files("#file", str(folders["coat"]))
            expect(notice).to_be_visible()
            expect(notice).to_contain_text("The image looks unlike what the model 'default' was trained on")
            expect(notice).to_contain_text("trained on mnist-sample")
            expect(page.locator("#results .card")).to_have_count(18)
            badges = page.locator("#results .card .novel-badge")
            expect(badges).to_have_count(report.novel)
            expect(badges.first).to_have_text("unlike training data")
            page.set_input_files("#file", str(folders["digit"]))
            expect(page.locator("#query-title")).to_have_text("Your image")
            expect(notice).to_be_hidden()
            assert not errors, errors
        finally:
            browser.close()

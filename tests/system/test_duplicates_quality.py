"""`Duplicates` at the default model's near-duplicate distance finds planted re-encoded copies among real
digits, through the real services: 1,000 MNIST digits (PNG) and 100 copies of 100 of them (JPEG, WebP,
resized), indexed through the client; `IndexClient.duplicates(D)` with D the card's `duplicate_distance`.

- recall: the share of the planted (original, copy) pairs whose two items are in one group;
- precision: among all pairs of items placed in the same group (a group of n items holds n(n-1)/2 of
  them), the share that are planted pairs. A link between two different digits, or a group that chains
  several pairs together, lowers it.

Both must be at least 0.95 (issue 16). The copies are of the kinds the card says D catches; smooth
resamplings (Lanczos, bicubic) move a digit further than its nearest same-class neighbour on the shipped
models (the fit to 28x28 blurs it and widens its box), so no D catches them without linking different
digits: the card lists them under `not_caught` (tools/duplicate_distance.py)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest

from encoder_service.duplicate_distance import choose_distance, copy_bytes, nothing_close_factor, png_bytes
from encoder_service.model_dir import DEFAULT_MODEL_DIR, read_card
from encoder_service.service import EncoderService
from imgsearch.client import ImageSearch
from index_service.service import IndexService
from tests.support import address, mnist_sample, serve, start_encoder, start_index
from tools.duplicate_distance import CARD_KEYS, measure_model

DIGITS = 1_000
PLANTED = 100
KINDS = ("JPEG q85", "JPEG q75", "WebP lossy q80", "2x nearest, PNG", "10x nearest, PNG")  # 20 of each
BATCH = 250


@pytest.fixture(scope="module")
def encoder() -> Iterator[EncoderService]:
    yield from serve(start_encoder())


@pytest.fixture
def search(encoder: EncoderService, tmp_path: Path) -> Iterator[ImageSearch]:
    index: IndexService = start_index(tmp_path / "index")
    try:
        with ImageSearch(address(encoder), address(index), 120) as client:
            yield client
    finally:
        index.stop(0)


def quality(groups: list[list[str]], planted: set[frozenset[str]]) -> tuple[float, float, int]:
    """(precision, recall, pairs placed together): see the module's docstring."""
    together = {frozenset(pair) for ids in groups for pair in combinations(ids, 2)}
    found = len(planted & together)
    precision = found / len(together) if together else 1.0
    return precision, found / len(planted), len(together)


def test_quality_counts_pairs_within_groups() -> None:
    planted = {frozenset(("a", "a'")), frozenset(("b", "b'"))}
    assert quality([["a", "a'"], ["b", "b'"]], planted) == (1.0, 1.0, 2)
    assert quality([["a", "a'"]], planted) == (1.0, 0.5, 1)
    assert quality([["a", "a'", "c"]], planted) == (1 / 3, 0.5, 3)  # a-c and a'-c are not planted


def test_d_sits_in_the_gap_and_leaves_out_the_kinds_past_it() -> None:
    distinct = np.linspace(0.1, 1.0, 1_000)  # p1 = 0.109
    copies = {"close": np.linspace(0.0, 0.05, 100), "near": np.linspace(0.0, 0.08, 100), "far": distinct}
    caught, distance = choose_distance(copies, distinct)
    assert caught == ["close", "near"]
    assert distance == 0.093  # sqrt(0.0792 * 0.109), two significant figures
    assert choose_distance({"same": np.zeros(10)}, np.zeros(10)) == ([], 0.0), "all identical: no gap"
    assert nothing_close_factor(np.linspace(0, 0.5, 101), 0.1) == 5.0  # p99 0.495: 4.95, up to a half
    assert nothing_close_factor(np.linspace(0, 0.05, 101), 0.1) == 1.0, "at least D"


def test_the_shipped_cards_hold_what_the_tool_measures() -> None:
    """The default model's card records what `python -m tools.duplicate_distance --write` measures now
    (seeded samples, LiteRT), so a retrained model with a stale D fails here; within a little, for
    another CPU's float rounding."""
    card = read_card(DEFAULT_MODEL_DIR)
    measurement, sample, outside = measure_model(DEFAULT_MODEL_DIR)
    entries = measurement.card_entries(sample, outside)
    assert set(CARD_KEYS) <= set(card)
    assert entries["duplicate_distance"] == pytest.approx(card["duplicate_distance"], rel=0.02)
    assert entries["nothing_close_factor"] == pytest.approx(card["nothing_close_factor"], abs=0.5)
    measured, recorded = entries["duplicate_distance_measurement"], card["duplicate_distance_measurement"]
    assert measured["caught"] == recorded["caught"]
    for kind, figures in measured["copies"].items():
        assert figures["p99"] == pytest.approx(recorded["copies"][kind]["p99"], rel=0.01, abs=1e-4), kind
    assert measured["nearest_distinct"] == pytest.approx(recorded["nearest_distinct"], rel=0.01)
    rates = measured["rates"]
    assert rates["caught_copies_within_d"] >= 0.99 and rates["nearest_distinct_within_d"] <= 0.01


def test_planted_copies_are_found_at_the_default_distance(search: ImageSearch) -> None:
    card = read_card(DEFAULT_MODEL_DIR)
    distance = float(card["duplicate_distance"])
    assert set(KINDS) <= set(card["duplicate_distance_measurement"]["caught"])
    x, y = mnist_sample(DIGITS)
    ids = [f"digit-{n:04d}" for n in range(DIGITS)]
    files = [png_bytes(pixels) for pixels in x]
    metadata = [{"label": str(label), "planted": "original"} for label in y]
    copied = np.sort(np.random.default_rng(16).choice(DIGITS, PLANTED, replace=False))
    planted: set[frozenset[str]] = set()
    for n, row in enumerate(copied.tolist()):
        kind = KINDS[n % len(KINDS)]
        copy_id = f"{ids[row]}-copy"
        ids.append(copy_id)
        files.append(copy_bytes(x[row], kind))
        metadata.append({"label": str(y[row]), "planted": kind})
        planted.add(frozenset((ids[row], copy_id)))
    for start in range(0, len(ids), BATCH):
        stop = start + BATCH
        search.add(ids[start:stop], files[start:stop], metadata[start:stop])

    started = time.perf_counter()
    found = search.index.duplicates(distance)
    seconds = time.perf_counter() - started
    assert found.items == DIGITS + PLANTED
    assert all(widest <= distance for _, widest in found.groups)
    precision, recall, together = quality([group for group, _ in found.groups], planted)
    print(
        f"\nD = {distance}: {len(found.groups)} groups, {found.pairs} linked pairs, {together} pairs in "
        f"groups; precision {precision:.3f}, recall {recall:.3f}; duplicates took {seconds * 1e3:.0f} ms"
    )
    assert recall >= 0.95, f"recall {recall:.3f}: {PLANTED - round(recall * PLANTED)} planted copies missed"
    assert precision >= 0.95, f"precision {precision:.3f}: {together} pairs in groups, {len(planted)} planted"

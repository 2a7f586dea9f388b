"""The filtered-search and duplicates benchmark sections' helpers, in a second or two: the metadata and its
masks, the report, the planted vectors. No timing is asserted: measured speed never goes in a test."""

from __future__ import annotations

import numpy as np

from bench import duplicates, filters
from bench.__main__ import SECTIONS
from encoder_service.model_dir import DEFAULT_MODEL_DIR, read_card


def test_the_sections_are_listed() -> None:
    assert {"filters", "duplicates"} <= set(SECTIONS)


def test_each_selectivity_keeps_its_share() -> None:
    metadata, masks = filters.make_metadata(2_000)
    assert len(metadata) == 2_000
    for percent in filters.SELECTIVITIES:
        key = filters.key_of(percent)
        assert int(masks[percent].sum()) == round(2_000 * percent / 100), percent
        assert [item[key] == "1" for item in metadata] == masks[percent].tolist()
    assert masks[0.1].sum() == 2 and (masks[0.1] <= masks[1.0]).all(), "the sets are nested"
    assert filters.make_metadata(2_000)[0] == metadata, "seeded"


def test_the_filters_report() -> None:
    rng = np.random.default_rng(0)
    names = ["echo_request", "echo_reply", "faiss", "bitmap", "subset", "store", "service"]
    rows = []
    for percent in (None, *filters.SELECTIVITIES):
        row = filters.Row(percent, 100)
        row.times = {
            name: rng.uniform(1, 2, 10) * 1e-3
            for name in names
            if (name in ("bitmap", "subset")) == (percent is not None)
            or name not in ("faiss", "bitmap", "subset")
        }
        rows.append(row)
    section = filters.report(filters.QUICK, rows, 1.0)
    assert len(section.figures) == 1 + len(filters.SELECTIVITIES)
    assert section.figures[0].name == "index service search, no filter"
    assert all(f.ratio is not None and f.ratio > 0 for f in section.figures)
    assert not any(f.headline for f in section.figures), "no target without the unfiltered calls among them"
    table = section.tables[0][1]
    assert "| no filter | 100 |" in table and "| 0.1% | 100 |" in table
    # The target: the 1% row also times the service without a filter, among its filtered calls.
    one = next(row for row in rows if row.percent == filters.TARGET_PERCENT)
    one.times["service"] = np.full(10, 1e-3)
    one.times["service_unfiltered"] = np.full(10, 4e-3)
    target = filters.report(filters.QUICK, rows, 1.0).figures[0]
    assert target.headline == "filtered-1pct" and target.target == "ratio <= 0.2"
    assert (target.value, target.reference_value, target.ratio, target.met) == (1.0, 4.0, 0.25, False)
    assert "under 0.80 ms" in target.note and "`Stats`" not in target.note
    one.times["service_stats"] = np.full(10, 0.9e-3)
    target = filters.report(filters.QUICK, rows, 1.0).figures[0]
    assert "the service's lightest call, `Stats` through the same client, 0.90 ms)" in target.note


def test_duplicates_target_is_issue_18s() -> None:
    assert duplicates.TARGET_S == 30.0


def test_planted_vectors_and_their_share_found() -> None:
    made = duplicates.make_vectors(duplicates.Plan(300, real=100, planted=20))
    assert len(made.ids) == len(set(made.ids)) == 300 and made.vectors.shape == (300, 128)
    np.testing.assert_allclose(np.linalg.norm(made.vectors, axis=1), 1.0, atol=1e-4)
    assert len(made.planted) == 20
    row_of = {item: row for row, item in enumerate(made.ids)}
    distance = float(read_card(DEFAULT_MODEL_DIR)["duplicate_distance"])
    gaps = [
        np.linalg.norm(made.vectors[row_of[a]] - made.vectors[row_of[b]]) for a, b in map(tuple, made.planted)
    ]
    assert np.mean(np.array(gaps) <= distance) >= 0.9, "the planted copies lie within D of their digits"
    pairs = [sorted(pair) for pair in made.planted]
    assert duplicates.found_share(pairs, made.planted) == 1.0
    assert duplicates.found_share([*pairs[:5], ["x", pairs[5][0]]], made.planted) == 0.25

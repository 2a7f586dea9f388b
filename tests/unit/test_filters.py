"""Filtered search on the FAISS store without gRPC: exactly the k nearest matching items at every
selectivity and for every operator (against a brute force over the matching items), max_distance at its
boundaries, the columns kept right through writes, and near-duplicate groups."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from index_service.duplicates import TooManyPairs, duplicate_groups
from index_service.faiss_store import VectorStore
from index_service.filters import (
    ANY_OF,
    EQUALS,
    EXISTS,
    NONE_OF,
    NOT_EQUALS,
    PREFIX,
    Condition,
    check_filter,
    matches,
)
from index_service.store import InvalidArgument

COUNT, DIM = 4000, 16
# One key per selectivity: `s100` on every item, then values that 50, 10, 1 and 0.1 % of the items hold.
SELECTIVITY = {"s100": 1.0, "s50": 0.5, "s10": 0.1, "s1": 0.01, "s01": 0.001}


def metadata_of(n: int) -> dict[str, str]:
    entries = {"s100": "yes", "folder": f"album{n % 7}/trip{n % 3}"}
    for key, share in SELECTIVITY.items():
        if key != "s100" and (n * 7919) % 1000 < share * 1000:
            entries[key] = "yes"
    if n % 2:
        entries["label"] = str(n % 10)
    return entries


@pytest.fixture(scope="module")
def filled() -> tuple[VectorStore, np.ndarray, list[str], list[dict[str, str]]]:
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((COUNT, DIM)).astype(np.float32)
    ids = [f"item-{n}" for n in range(COUNT)]
    metadata = [metadata_of(n) for n in range(COUNT)]
    store = VectorStore()
    store.upsert(ids, vectors, metadata, "v")
    return store, vectors, ids, metadata


def brute(vectors: np.ndarray, keep: list[int], queries: np.ndarray, k: int) -> list[list[int]]:
    if not keep:
        return [[] for _ in queries]
    base = vectors[keep].astype(np.float64)
    distances = ((queries[:, None, :].astype(np.float64) - base[None]) ** 2).sum(-1)
    order = np.argsort(distances, axis=1, kind="stable")[:, :k]
    return [[keep[i] for i in row] for row in order]


def check_against_brute(filled, conditions, k=10):  # type: ignore[no-untyped-def]
    store, vectors, ids, metadata = filled
    conditions = check_filter(conditions)
    keep = [n for n in range(COUNT) if matches(conditions, metadata[n])]
    queries = np.random.default_rng(len(keep)).standard_normal((5, DIM)).astype(np.float32)
    got = store.search(queries, k, conditions=conditions)
    expected = brute(vectors, keep, queries, k)
    assert [[m.id for m in row] for row in got] == [[ids[n] for n in row] for row in expected]
    return len(keep)


@pytest.mark.parametrize("key,share", sorted(SELECTIVITY.items()))
@pytest.mark.parametrize("op", [EQUALS, ANY_OF, EXISTS, PREFIX, NOT_EQUALS, NONE_OF])
def test_every_operator_at_every_selectivity_equals_a_brute_force(filled, key, share, op) -> None:  # type: ignore[no-untyped-def]
    values = {
        EQUALS: ("yes",),
        ANY_OF: ("yes", "nope"),
        EXISTS: (),
        PREFIX: ("ye",),
        NOT_EQUALS: ("yes",),
        NONE_OF: ("yes", "x"),
    }[op]
    kept = check_against_brute(filled, [Condition(key, op, values)])
    selected = round(share * COUNT) if op not in (NOT_EQUALS, NONE_OF) else COUNT - round(share * COUNT)
    assert abs(kept - selected) <= max(2, 0.02 * COUNT * share)  # the planted selectivity


def test_conditions_are_anded_and_prefixes_match_paths(filled) -> None:  # type: ignore[no-untyped-def]
    kept = check_against_brute(
        filled, [Condition("folder", PREFIX, ("album3/",)), Condition("label", ANY_OF, ("3", "5", "7"))]
    )
    assert 0 < kept < COUNT / 7
    assert check_against_brute(filled, [Condition("label", EQUALS, ("no such",))]) == 0


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["label", "folder", "s10", "s1", "missing"]),
            st.sampled_from([EQUALS, NOT_EQUALS, ANY_OF, NONE_OF, PREFIX, EXISTS]),
            st.lists(
                st.sampled_from(["1", "3", "yes", "album1/trip1", "album", "a"]), min_size=1, max_size=3
            ),
        ),
        max_size=3,
    ),
    st.integers(1, 30),
)
def test_any_filter_equals_a_brute_force(filled, raw, k) -> None:  # type: ignore[no-untyped-def]
    conditions = []
    for key, op, values in raw:
        chosen = (
            () if op == EXISTS else tuple(values[:1]) if op in (EQUALS, NOT_EQUALS, PREFIX) else tuple(values)
        )
        conditions.append(Condition(key, op, chosen))
    check_against_brute(filled, conditions, k)


def test_max_distance_at_its_boundaries(filled) -> None:  # type: ignore[no-untyped-def]
    store = filled[0]
    query = filled[1][:1] + 0.01
    nearest = store.search(query, 5)[0]
    third = nearest[2].distance
    assert [m.id for m in store.search(query, 5, max_distance=third)[0]] == [m.id for m in nearest[:3]]
    below = float(np.nextafter(np.float32(third), np.float32(0)))
    assert len(store.search(query, 5, max_distance=below)[0]) == 2
    assert store.search(query, 5, max_distance=0.0)[0] == []
    exact = store.search(filled[1][:1], 5, max_distance=0.0)[0]
    assert [m.id for m in exact] == ["item-0"] and exact[0].distance == 0.0
    by_id = store.search_by_id(["item-0"], 5, max_distance=third)[0]
    assert all(m.distance <= third for m in by_id) and "item-0" not in [m.id for m in by_id]


def test_columns_follow_writes() -> None:
    store = VectorStore()
    vectors = np.eye(6, dtype=np.float32)
    store.upsert([f"i{n}" for n in range(6)], vectors, [{"label": str(n % 2)} for n in range(6)], "v")
    odd = (Condition("label", EQUALS, ("1",)),)
    assert sorted(m.id for m in store.search(vectors[:1], 6, conditions=odd)[0]) == ["i1", "i3", "i5"]
    store.delete(["i1"])  # the last row moves into its place
    store.upsert(["i2"], vectors[2:3], [{"label": "1"}], "v")  # replaced, now odd
    store.upsert(["new"], vectors[:1], [{}], "v")  # no label
    assert sorted(m.id for m in store.search(vectors[:1], 6, conditions=odd)[0]) == ["i2", "i3", "i5"]
    unlabelled = (Condition("label", NONE_OF, ("0", "1")),)
    assert [m.id for m in store.search(vectors[:1], 6, conditions=unlabelled)[0]] == ["new"]


def test_bad_filters_name_the_condition() -> None:
    for conditions, message in (
        ([Condition("", EQUALS, ("x",))], "condition 0 .* keys must be"),
        ([Condition("k", "", ("x",))], "condition 0 .* no operator"),
        (
            [Condition("ok", EXISTS, ()), Condition("k", EQUALS, ("a", "b"))],
            "condition 1 .key 'k'.: equals takes exactly one",
        ),
        ([Condition("k", ANY_OF, ())], "any_of takes 1 to 1024 values"),
        ([Condition("k", EXISTS, ("x",))], "exists takes no values"),
        ([Condition("k", EQUALS, ("x" * 5000,))], "over 4096 bytes"),
        ([Condition("k", EXISTS, ())] * 17, "17 conditions"),
    ):
        with pytest.raises(InvalidArgument, match=message):
            check_filter(conditions)


def test_duplicate_groups_are_connected_components() -> None:
    rng = np.random.default_rng(0)
    base = rng.standard_normal((200, 8)).astype(np.float32) * 10
    chain = base[0] + np.array([[0.1 * n] + [0] * 7 for n in range(1, 4)], np.float32)  # 0.1 apart
    twin = base[5:6].copy()
    vectors = np.concatenate([base, chain, twin])
    ids = [f"b{n}" for n in range(200)] + ["c1", "c2", "c3", "twin"]
    groups, pairs = duplicate_groups(ids, vectors, 0.15)
    assert [(g, round(d, 3)) for g, d in groups] == [(["b0", "c1", "c2", "c3"], 0.1), (["b5", "twin"], 0.0)]
    assert pairs == 4
    assert duplicate_groups(ids, vectors, 0.0)[0] == [(["b5", "twin"], 0.0)]
    with pytest.raises(TooManyPairs, match="more than 10 pairs"):
        duplicate_groups(ids, vectors, 1000.0, max_pairs=10)


def test_duplicates_of_the_store_take_a_filter() -> None:
    store = VectorStore()
    vectors = np.array([[0, 0], [0, 0], [5, 5], [5, 5.01]], np.float32)
    store.upsert(["a", "b", "c", "d"], vectors, [{"k": "x"}, {"k": "x"}, {"k": "y"}, {}], "v")
    groups, pairs, items = store.duplicates(0.1)
    assert (groups, pairs, items) == ([(["a", "b"], 0.0), (["c", "d"], pytest.approx(0.01, abs=1e-4))], 2, 4)
    assert store.duplicates(0.1, (Condition("k", EQUALS, ("x",)),))[0] == [(["a", "b"], 0.0)]

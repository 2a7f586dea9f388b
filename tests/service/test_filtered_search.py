"""Filtered search, distance thresholds, filtered scans and near-duplicates through gRPC, on every index
backend: exactly the k nearest matching items at selectivities of 100, 50, 10, 1 and 0.1 % for every
operator (against a brute force over the matching items), max_distance at its boundaries, and the codes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing

import grpc
import numpy as np
import pytest

from imgsearch.client import IndexClient, ServiceError
from imgsearch.filters import Condition
from index_service.filters import Condition as StoreCondition
from index_service.filters import matches
from tests.support import address, every_backend, start_index

COUNT, DIM = 3000, 16
SHARES = {"s100": 1.0, "s50": 0.5, "s10": 0.1, "s1": 0.01, "s01": 0.001}
OPERATORS = {
    "equals": ("yes",),
    "any_of": ("yes", "maybe"),
    "exists": (),
    "prefix": ("ye",),
    "not_equals": ("yes",),
    "none_of": ("yes", "maybe"),
}


def metadata_of(n: int) -> dict[str, str]:
    entries = {"label": str(n % 10), "path": f"album{n % 4}/img{n}.png"}
    for key, share in SHARES.items():
        if (n * 7919) % 1000 < share * 1000:
            entries[key] = "yes"
    return entries


@pytest.fixture
def filled(index_client: IndexClient) -> Iterator[tuple[IndexClient, np.ndarray, list[dict[str, str]]]]:
    vectors = np.random.default_rng(5).standard_normal((COUNT, DIM)).astype(np.float32)
    metadata = [metadata_of(n) for n in range(COUNT)]
    for start in range(0, COUNT, 1000):
        index_client.upsert(
            [f"i{n}" for n in range(start, start + 1000)],
            vectors[start : start + 1000],
            metadata[start : start + 1000],
            "m",
        )
    yield index_client, vectors, metadata


def expected(vectors: np.ndarray, keep: list[int], queries: np.ndarray, k: int) -> list[list[str]]:
    if not keep:
        return [[] for _ in queries]
    base = vectors[keep].astype(np.float64)
    distances = ((queries[:, None, :].astype(np.float64) - base[None]) ** 2).sum(-1)
    return [[f"i{keep[i]}" for i in row] for row in np.argsort(distances, axis=1, kind="stable")[:, :k]]


@every_backend
def test_every_operator_at_every_selectivity_equals_a_brute_force(filled) -> None:  # type: ignore[no-untyped-def]
    client, vectors, metadata = filled
    queries = np.random.default_rng(9).standard_normal((3, DIM)).astype(np.float32)
    for key in SHARES:
        for op, values in OPERATORS.items():
            conditions = [Condition(key, op, values)]
            keep = [n for n in range(COUNT) if matches((StoreCondition(key, op, values),), metadata[n])]
            got = client.search(queries, 10, filter=conditions)
            assert [[m.id for m in row] for row in got] == expected(vectors, keep, queries, 10), (key, op)


@every_backend
def test_conditions_are_anded_and_search_by_id_filters_its_results(filled) -> None:  # type: ignore[no-untyped-def]
    client, vectors, metadata = filled
    conditions = [Condition("path", "prefix", ("album1/",)), Condition("label", "any_of", ("1", "5"))]
    store_conditions = tuple(StoreCondition(c.key, c.op, c.values) for c in conditions)
    keep = [n for n in range(COUNT) if matches(store_conditions, metadata[n])]
    assert 0 < len(keep) < COUNT // 4
    got = client.search(vectors[:2], 7, filter=conditions)
    assert [[m.id for m in row] for row in got] == expected(vectors, keep, vectors[:2], 7)
    by_id = client.search_by_id(["i1"], 5, filter=conditions)[0]  # i1 itself matches: left out
    assert [m.id for m in by_id] == [i for i in expected(vectors, keep, vectors[1:2], 6)[0] if i != "i1"][:5]
    pages = list(client.scan(filter=conditions))
    assert sorted(i for p in pages for i in p.ids) == sorted(f"i{n}" for n in keep)
    assert all(p.total == len(keep) for p in pages)


@every_backend
def test_max_distance_at_its_boundaries(filled) -> None:  # type: ignore[no-untyped-def]
    client, vectors, _ = filled
    query = vectors[:1] + 0.05
    nearest = client.search(query, 5)[0]
    third = nearest[2].distance
    assert [m.id for m in client.search(query, 5, max_distance=third)[0]] == [m.id for m in nearest[:3]]
    below = float(np.nextafter(np.float32(third), np.float32(0)))
    assert [m.id for m in client.search(query, 5, max_distance=below)[0]] == [m.id for m in nearest[:2]]
    assert client.search(query, 5, max_distance=0.0)[0] == []
    assert [m.id for m in client.search(vectors[:1], 5, max_distance=0.0)[0]] == ["i0"]
    by_id = client.search_by_id(["i0"], 5, max_distance=third)[0]
    assert by_id and all(m.distance <= third for m in by_id) and "i0" not in [m.id for m in by_id]


@every_backend
def test_bad_filters_and_thresholds_are_refused_naming_them(index_client: IndexClient) -> None:
    index_client.upsert(["a"], np.ones((1, 4), np.float32), [{"k": "v"}], "m")
    for conditions, message in (
        ([Condition("k", "equals", ("a", "b"))], "filter condition 0 (key 'k'): equals takes exactly one"),
        ([Condition("", "exists")], "filter condition 0"),
        ([Condition("k", "exists"), Condition("j", "any_of")], "filter condition 1 (key 'j')"),
    ):
        with pytest.raises(ServiceError, match=message.replace("(", r"\(").replace(")", r"\)")) as refused:
            index_client.search(np.ones((1, 4), np.float32), 3, filter=conditions)
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(ServiceError, match="max_distance must be 0 or more") as refused:
        index_client.search(np.ones((1, 4), np.float32), 3, max_distance=-1.0)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(ServiceError, match="max_distance must be 0 or more"):
        index_client.duplicates(-0.5)


@every_backend
def test_duplicates_groups_planted_copies(index_client: IndexClient) -> None:
    rng = np.random.default_rng(2)
    base = rng.standard_normal((500, 8)).astype(np.float32) * 5
    copies = base[:20] + rng.normal(0, 0.001, (20, 8)).astype(np.float32)
    ids = [f"b{n}" for n in range(500)] + [f"copy-of-b{n}" for n in range(20)]
    labels = [{"half": "a" if n % 2 == 0 else "b"} for n in range(500)] + [
        {"half": "a" if n % 2 == 0 else "b"} for n in range(20)
    ]
    index_client.upsert(ids, np.concatenate([base, copies]), labels, "m")
    found = index_client.duplicates(0.05)
    assert (found.items, found.pairs) == (520, 20)
    assert sorted(tuple(g) for g, _ in found.groups) == sorted((f"b{n}", f"copy-of-b{n}") for n in range(20))
    assert all(0 < d <= 0.05 for _, d in found.groups)
    half = index_client.duplicates(0.05, filter=[Condition("half", "equals", ("a",))])
    assert half.items == 260 and len(half.groups) == 10
    everything = index_client.duplicates(1e6)  # every pair linked: one group
    assert len(everything.groups) == 1 and everything.pairs == 520 * 519 // 2


def test_duplicates_past_the_pair_limit_are_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    service = start_index(tmp_path / "index", "--max-duplicate-pairs", "100")
    try:
        with closing(IndexClient(address(service))) as client:
            client.upsert([f"i{n}" for n in range(50)], np.zeros((50, 4), np.float32), (), "m")
            with pytest.raises(ServiceError, match="links more than 100 pairs") as refused:
                client.duplicates(0.0)
            assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        service.stop(0)

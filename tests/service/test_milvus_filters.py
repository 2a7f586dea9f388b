"""Filters, max_distance and near-duplicates in the Milvus store, on Milvus Lite and on a Milvus 2.3.5 server:
every answer checked against a brute force over the items `filters.matches` keeps.

One corpus per backend for the module (3,000 random items of dim 16 with near-copies planted among them,
and metadata giving each operator a condition at 100, 50, 10, 1 and 0.1 %), and a small collection of
items whose keys and values hold what a filter expression must escape. The Milvus server's part is
skipped in the fast loop (IMGSEARCH_FAST_TESTS=1), as the server is."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import pytest

from index_service.duplicates import TooManyPairs, duplicate_groups
from index_service.filters import (
    ANY_OF,
    EQUALS,
    EXISTS,
    MAX_CONDITIONS,
    MAX_VALUES,
    NONE_OF,
    NOT_EQUALS,
    PREFIX,
    Condition,
    Filter,
    matches,
)
from index_service.milvus_filters import condition_expression, filter_expression, prefix_bound
from index_service.store import FailedPrecondition, Match
from tests.support import MILVUS_MISSING, MILVUS_SERVER_SKIP, MILVUS_SKIP, MilvusLite
from tools.milvus_server import MilvusServer

pytestmark = MILVUS_SKIP

if not MILVUS_MISSING:
    from pymilvus import DataType, MilvusClient

    from index_service.milvus_store import MODEL_VERSION_PROPERTY, MilvusCollections, MilvusStore

DIM = 16
COUNT = 3000
SHARES = {"100": 1.0, "50": 0.5, "10": 0.1, "1": 0.01, "0.1": 0.001}
ANY = ("p", "q\"'", "r%_", "s\\")  # what any_of asks for (with a value no item has)
PREFIX_TEXT = "i%_n\"\\'é"  # a prefix holding LIKE's wildcards, a quote, a backslash and unicode
# (base item, near-copies at these offsets): groups that Duplicates(0.05) must find, and nothing else.
PLANTED = {3: (0.0,), 10: (0.004, 0.008), 20: (0.01,), 30: (0.003, 0.006, 0.009, 0.012), 40: (0.02,)}
BASE = COUNT - sum(len(offsets) for offsets in PLANTED.values())  # random items, and the copies
SPECIAL_VALUES = (
    'q"uote',
    "it's",
    "back\\slash",
    "back\\\\slash",
    "end\\",
    "\\",
    '\\"',
    "50%_off",
    "50%",
    "50xxoff",
    "a_b",
    "axb",
    "a%b",
    "%",
    "_",
    "",
    " ",
    "héllo ✓ 😀",
    "line\nbreak\ttab\rreturn",
    "nul\x00byte",
    "\x01\x7f",
    "\u2028",
    "\ud7ff",
    "\ue000",
    "\U0010ffff",
    "\U0010ffff\U0010ffff",
    "a\U0010ffff",
    "[x]",
    "a*b.c",
    'x") or (meta["s"] == "y',
    "1",
    "w" * 4096,
)
SPECIAL_KEYS = (
    'k"ey',
    "k\\ey",
    "a/b",
    "~1",
    "~",
    "a.b",
    "c[0]",
    "$meta",
    "id",
    "meta",
    "ü",
    "k\nl",
    "nul\x00key",
    "'",
    "%",
    "0",
)


class Backend(NamedTuple):
    kind: str  # "lite" or "server"
    uri: str
    collections: MilvusCollections
    corpus: MilvusStore
    ids: list[str]
    vectors: np.ndarray
    metadata: list[dict[str, str]]
    specials: MilvusStore
    special_ids: list[str]
    special_vectors: np.ndarray
    special_metadata: list[dict[str, str]]


def planted_ids() -> list[str]:
    return [f"near/{base}/{n}" for base, offsets in PLANTED.items() for n in range(len(offsets))]


def corpus_items() -> tuple[list[str], np.ndarray, list[dict[str, str]]]:
    rng = np.random.default_rng(16)
    base = rng.standard_normal((BASE, DIM)).astype(np.float32)
    copies = []
    for item, offsets in PLANTED.items():
        for offset in offsets:
            direction = rng.standard_normal(DIM)
            copies.append(base[item] + (offset * direction / np.linalg.norm(direction)).astype(np.float32))
    vectors = np.concatenate([base, np.array(copies, np.float32)])
    ids = [f"img/{n}" for n in range(BASE)] + planted_ids()
    rank = rng.permutation(COUNT)  # item -> its rank: the items of rank < share x COUNT match
    metadata = [entries(int(rank[n])) for n in range(COUNT)]
    return ids, vectors, metadata


def entries(rank: int) -> dict[str, str]:
    """The metadata of the item of this rank: for each share, a key per operator whose condition (see
    `condition`) matches the items of rank below share x COUNT. Half the others lack the key."""
    found = {"rank": str(rank), "parity": "even" if rank % 2 == 0 else "odd"}
    for number, (name, share) in enumerate(SHARES.items()):
        inside, odd = rank < round(share * COUNT), rank % 2 == 1
        if inside:
            found[f"e{name}"] = "in"
            found[f"a{name}"] = ANY[rank % len(ANY)]
            found[f"p{name}"] = f"{PREFIX_TEXT}{rank}"
            found[f"x{name}"] = ""
            if not odd:  # not_equals and none_of match the items without the key as well
                found[f"n{name}"] = found[f"m{name}"] = "y"
        else:
            found[f"n{name}"] = "x"
            found[f"m{name}"] = ("x", "w")[rank % 2]
            if not odd:
                found[f"e{name}"] = "out"
                found[f"a{name}"] = "t"
                # What a prefix taken as a LIKE pattern (or escaped wrongly) would match as well.
                decoys = (
                    PREFIX_TEXT.replace("%", "Q"),
                    PREFIX_TEXT.replace("_", "Z"),
                    PREFIX_TEXT.replace("\\", "\\\\"),
                    PREFIX_TEXT[:-1],
                    PREFIX_TEXT[:-1] + "e",
                )
                found[f"p{name}"] = decoys[(rank // 2 + number) % len(decoys)] + str(rank)
    return found


def condition(op: str, share: str) -> Condition:
    return {
        EQUALS: Condition(f"e{share}", EQUALS, ("in",)),
        NOT_EQUALS: Condition(f"n{share}", NOT_EQUALS, ("x",)),
        ANY_OF: Condition(f"a{share}", ANY_OF, (*ANY, "never")),
        NONE_OF: Condition(f"m{share}", NONE_OF, ("x", "w")),
        PREFIX: Condition(f"p{share}", PREFIX, (PREFIX_TEXT,)),
        EXISTS: Condition(f"x{share}", EXISTS),
    }[op]


def special_items() -> tuple[list[str], np.ndarray, list[dict[str, str]]]:
    ids = [f"value/{n}" for n in range(len(SPECIAL_VALUES))] + [f"key/{n}" for n in range(len(SPECIAL_KEYS))]
    metadata = [{"s": value, "n": str(n)} for n, value in enumerate(SPECIAL_VALUES)]
    metadata += [{key: "v"} for key in SPECIAL_KEYS]
    metadata.append({})
    ids.append("bare")
    vectors = np.random.default_rng(17).standard_normal((len(ids), DIM)).astype(np.float32)
    return ids, vectors, metadata


def fill(store: MilvusStore, ids: list[str], vectors: np.ndarray, metadata: list[dict[str, str]]) -> None:
    for start in range(0, len(ids), 1000):
        stop = start + 1000
        store.upsert(ids[start:stop], vectors[start:stop], metadata[start:stop], "m1")


@pytest.fixture(scope="module", params=["lite", pytest.param("server", marks=MILVUS_SERVER_SKIP)])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    """The corpus and the special items, stored once per backend for the module."""
    milvus: MilvusLite | MilvusServer = request.getfixturevalue(
        "milvus_server" if request.param == "server" else "milvus_lite"
    )
    collections = MilvusCollections(milvus.uri, milvus.new_collection())
    try:
        collections.create("corpus")
        collections.create("specials")
        corpus, specials = collections.lookup("corpus")[1], collections.lookup("specials")[1]
        ids, vectors, metadata = corpus_items()
        fill(corpus, ids, vectors, metadata)
        special_ids, special_vectors, special_metadata = special_items()
        fill(specials, special_ids, special_vectors, special_metadata)
        yield Backend(
            request.param,
            milvus.uri,
            collections,
            corpus,
            ids,
            vectors,
            metadata,
            specials,
            special_ids,
            special_vectors,
            special_metadata,
        )
    finally:
        collections.remove_everything()
        collections.close()


def nearest(
    ids: list[str],
    vectors: np.ndarray,
    metadata: list[dict[str, str]],
    conditions: Filter,
    queries: np.ndarray,
    k: int,
    exclude: list[str] | None = None,
) -> list[list[tuple[str, float]]]:
    """The brute force: each query's k nearest items among those that match, (id, distance)."""
    keep = [n for n in range(len(ids)) if matches(conditions, metadata[n])]
    if not keep:
        return [[] for _ in queries]
    base = vectors[keep].astype(np.float64)
    distances = np.sqrt(((queries[:, None, :].astype(np.float64) - base[None]) ** 2).sum(-1))
    found = []
    for query, row in enumerate(distances):
        order = [int(i) for i in np.argsort(row, kind="stable")]
        if exclude is not None:
            order = [i for i in order if ids[keep[i]] != exclude[query]]
        found.append([(ids[keep[i]], float(row[i])) for i in order[:k]])
    return found


def assert_same(got: list[list[Match]], expected: list[list[tuple[str, float]]], what: object) -> None:
    assert [[m.id for m in row] for row in got] == [[i for i, _ in row] for row in expected], what
    for got_row, expected_row in zip(got, expected, strict=True):
        np.testing.assert_allclose(
            [m.distance for m in got_row], [d for _, d in expected_row], rtol=1e-4, atol=1e-4
        )


def search_corpus(
    backend: Backend, conditions: Filter, queries: np.ndarray, k: int, **options: Any
) -> tuple[list[list[Match]], list[list[tuple[str, float]]]]:
    got = backend.corpus.search(queries, k, "m1", conditions=conditions, **options)
    return got, nearest(backend.ids, backend.vectors, backend.metadata, conditions, queries, k)


# ---- the expressions, without Milvus ---------------------------------------------------------


def test_a_prefix_is_a_range_up_to_the_least_string_after_it() -> None:
    assert prefix_bound("ab") == "ac"
    assert prefix_bound("a\U0010ffff") == "b"
    assert prefix_bound("\U0010ffff\U0010ffff") is None
    assert prefix_bound("\ud7ff") == "\ue000"  # the surrogates are skipped
    strings = ["a", "ab", "ab\x00", "abz", "ac", "a\U0010ffff", "b", "\U0010ffff", "\U0010ffff!", "é", "ê"]
    for prefix in ("a", "ab", "a\U0010ffff", "\U0010ffff", "é"):
        bound = prefix_bound(prefix)
        assert [s for s in strings if prefix <= s and (bound is None or s < bound)] == [
            s for s in strings if s.startswith(prefix)
        ]


def test_every_condition_is_parenthesised_and_absent_keys_are_said() -> None:
    path = 'meta["k\\"ey"]'
    assert condition_expression(Condition('k"ey', EQUALS, ("v",)), "meta", server=True) == f'({path} == "v")'
    assert (
        condition_expression(Condition('k"ey', NOT_EQUALS, ("v",)), "meta", server=False)
        == f'((not exists {path}) or ({path} != "v"))'
    )
    assert condition_expression(Condition("k", ANY_OF, ("a", "b", "a")), "meta", server=True) == (
        '(meta["k"] in ["a", "b"])'
    )
    assert condition_expression(Condition("k", ANY_OF, ("a", "b", "c")), "meta", server=False) == (
        '((meta["k"] == "a") or ((meta["k"] == "b") or (meta["k"] == "c")))'
    )
    assert condition_expression(Condition("k", PREFIX, ("",)), "meta", server=True) == '(exists meta["k"])'
    assert (
        condition_expression(Condition("k\x00", EXISTS), "meta", server=True) == '(exists meta["k\\u0000"])'
    )
    assert condition_expression(Condition("k\x00", EXISTS), "meta", server=False) == '(exists meta["k\x00"])'
    assert filter_expression((), "meta", server=True) == ""


# ---- exact filtered search -------------------------------------------------------------------


@pytest.mark.parametrize("share", list(SHARES))
@pytest.mark.parametrize("op", [EQUALS, NOT_EQUALS, ANY_OF, NONE_OF, PREFIX, EXISTS])
def test_every_operator_at_every_selectivity_equals_a_brute_force(
    backend: Backend, op: str, share: str
) -> None:
    conditions = (condition(op, share),)
    matching = sum(matches(conditions, m) for m in backend.metadata)
    assert matching == round(SHARES[share] * COUNT)  # the corpus is made so
    queries = np.random.default_rng(len(share) + len(op)).standard_normal((4, DIM)).astype(np.float32)
    got, expected = search_corpus(backend, conditions, queries, 10)
    assert_same(got, expected, (op, share))
    assert all(len(row) == min(10, matching) for row in got)


def test_conditions_are_anded(backend: Backend) -> None:
    conditions = (
        condition(NOT_EQUALS, "50"),
        condition(PREFIX, "10"),
        Condition("parity", ANY_OF, ("even",)),
        Condition("nothing", NONE_OF, ("x",)),
    )
    matching = sum(matches(conditions, m) for m in backend.metadata)
    assert 0 < matching < 300
    got, expected = search_corpus(backend, conditions, backend.vectors[:3], 25)
    assert_same(got, expected, conditions)
    impossible = (condition(EQUALS, "1"), Condition("parity", EQUALS, ("none",)))
    assert backend.corpus.search(backend.vectors[:2], 5, conditions=impossible) == [[], []]


def test_search_by_id_filters_the_results_not_the_item_searched_from(backend: Backend) -> None:
    conditions = (condition(EQUALS, "10"),)
    inside = [i for i, m in zip(backend.ids, backend.metadata, strict=True) if matches(conditions, m)][:2]
    outside = [i for i, m in zip(backend.ids, backend.metadata, strict=True) if not matches(conditions, m)][
        :2
    ]
    searched = [*inside, *outside]
    rows = [backend.ids.index(i) for i in searched]
    got = backend.corpus.search_by_id(searched, 8, conditions=conditions)
    expected = nearest(
        backend.ids, backend.vectors, backend.metadata, conditions, backend.vectors[rows], 8, searched
    )
    assert_same(got, expected, searched)
    assert all(searched[n] not in [m.id for m in row] for n, row in enumerate(got))
    assert all(len(row) == 8 for row in got)


def test_the_rarest_filter_gives_fewer_than_k(backend: Backend) -> None:
    conditions = (condition(EXISTS, "0.1"),)
    got, expected = search_corpus(backend, conditions, backend.vectors[:2], 50)
    assert_same(got, expected, conditions)
    assert [len(row) for row in got] == [3, 3]


# ---- keys and values that need escaping ------------------------------------------------------


def special_conditions() -> list[Condition]:
    found: list[Condition] = []
    for value in SPECIAL_VALUES:
        found += [Condition("s", EQUALS, (value,)), Condition("s", NOT_EQUALS, (value,))]
        found += [Condition("s", PREFIX, (value[:length],)) for length in sorted({1, 2, 3, len(value)})]
    found += [
        Condition("s", ANY_OF, SPECIAL_VALUES[::3]),
        Condition("s", NONE_OF, SPECIAL_VALUES[::2]),
        Condition("s", PREFIX, ("",)),
        Condition("s", EXISTS),
        Condition("n", NONE_OF, ("1", "2")),
    ]
    for key in SPECIAL_KEYS:
        found += [
            Condition(key, EXISTS),
            Condition(key, EQUALS, ("v",)),
            Condition(key, NOT_EQUALS, ("v",)),
            Condition(key, PREFIX, ("v",)),
        ]
    return found


def test_keys_and_values_with_quotes_backslashes_wildcards_and_unicode_match_as_filters_say(
    backend: Backend,
) -> None:
    query = backend.special_vectors[:1]
    every = len(backend.special_ids)
    for where in special_conditions():
        conditions = (where,)
        got = backend.specials.search(query, every, conditions=conditions)
        expected = nearest(
            backend.special_ids, backend.special_vectors, backend.special_metadata, conditions, query, every
        )
        assert_same(got, expected, where)
    stored = {i: m for i, m in backend.specials.get(backend.special_ids)[0]}
    assert [stored[i] for i in backend.special_ids] == backend.special_metadata


def test_a_thousand_values_and_sixteen_conditions(backend: Backend) -> None:
    query = backend.special_vectors[:1]
    every = len(backend.special_ids)
    wanted = (*SPECIAL_VALUES[:24], *(f"filler{n}" for n in range(MAX_VALUES - 24)))
    many = (
        Condition("s", ANY_OF, wanted),
        *(Condition("s", NONE_OF, tuple(f"{n}-{v}" for v in wanted)) for n in range(MAX_CONDITIONS - 2)),
        Condition("s", NONE_OF, (*SPECIAL_VALUES[:4], *(f"other{n}" for n in range(MAX_VALUES - 4)))),
    )
    assert len(many) == MAX_CONDITIONS and all(len(c.values) == MAX_VALUES for c in many)
    got = backend.specials.search(query, every, conditions=many)
    expected = nearest(
        backend.special_ids, backend.special_vectors, backend.special_metadata, many, query, every
    )
    assert_same(got, expected, "many")
    assert len(got[0]) == 20


# ---- max_distance ----------------------------------------------------------------------------


def test_max_distance_keeps_a_result_exactly_at_it_and_drops_one_just_beyond(backend: Backend) -> None:
    query = backend.vectors[:1] + np.float32(0.05)
    ranked = backend.corpus.search(query, 10)[0]
    for cut in (0, 4, 9):
        at = ranked[cut].distance
        kept = backend.corpus.search(query, 10, max_distance=at)[0]
        assert [m.id for m in kept] == [m.id for m in ranked[: cut + 1]]
        below = float(np.nextafter(np.float32(at), np.float32(0)))
        assert [m.id for m in backend.corpus.search(query, 10, max_distance=below)[0]] == [
            m.id for m in ranked[:cut]
        ]
    assert backend.corpus.search(query, 10, max_distance=0.0) == [[]]
    far = np.full((1, DIM), 100.0, np.float32)
    assert backend.corpus.search(far, 10, max_distance=50.0) == [[]]
    # The cut comes after the exact top k: a wide max_distance still gives k.
    assert len(backend.corpus.search(query, 10, max_distance=1e9)[0]) == 10


def test_max_distance_zero_gives_exact_duplicates_only(backend: Backend) -> None:
    twin = backend.ids.index("near/3/0")  # planted at offset 0: the same vector as img/3
    found = backend.corpus.search(backend.vectors[twin : twin + 1], 10, max_distance=0.0)[0]
    assert sorted(m.id for m in found) == ["img/3", "near/3/0"] and all(m.distance == 0 for m in found)
    by_id = backend.corpus.search_by_id(["img/3", "img/10"], 10, max_distance=0.0)
    assert [[m.id for m in row] for row in by_id] == [["near/3/0"], []]


def test_search_by_id_with_a_filter_and_max_distance(backend: Backend) -> None:
    conditions = (Condition("parity", EQUALS, ("even",)),)
    searched = ["img/30", "img/31"]
    rows = [backend.ids.index(i) for i in searched]
    expected = nearest(
        backend.ids, backend.vectors, backend.metadata, conditions, backend.vectors[rows], 6, searched
    )
    cut = expected[0][2][1] + 1e-6  # between the third and the fourth of the first
    got = backend.corpus.search_by_id(searched, 6, conditions=conditions, max_distance=cut)
    assert_same(got, [[(i, d) for i, d in row if d <= cut] for row in expected], "by id")
    assert [m.id for m in got[0]] == [i for i, _ in expected[0][:3]]


# ---- near-duplicates -------------------------------------------------------------------------


def reference_groups(backend: Backend, max_distance: float, conditions: Filter = ()) -> tuple[Any, int, int]:
    keep = [n for n in range(COUNT) if matches(conditions, backend.metadata[n])]
    groups, pairs = duplicate_groups([backend.ids[n] for n in keep], backend.vectors[keep], max_distance)
    return groups, pairs, len(keep)


def test_duplicates_finds_the_planted_near_copies(backend: Backend) -> None:
    calls = []
    groups, pairs, items = backend.corpus.duplicates(0.05, check=lambda: calls.append(1))
    assert (groups, pairs, items) == reference_groups(backend, 0.05)
    assert items == COUNT and len(calls) >= 2  # checked between pages (and between the comparison's chunks)
    expected = sorted(
        sorted([f"img/{base}", *(f"near/{base}/{n}" for n in range(len(offsets)))])
        for base, offsets in PLANTED.items()
    )
    assert sorted(ids for ids, _ in groups) == expected
    assert [len(ids) for ids, _ in groups] == sorted((len(o) + 1 for o in PLANTED.values()), reverse=True)
    widest = {ids[0]: distance for ids, distance in groups}
    assert widest["img/3"] == 0.0
    assert widest["img/40"] == pytest.approx(0.02, rel=1e-3)
    assert backend.corpus.duplicates(0.0)[0] == [(["img/3", "near/3/0"], 0.0)]


def test_duplicates_of_the_matching_items_only(backend: Backend) -> None:
    conditions = (Condition("parity", EQUALS, ("even",)),)
    got = backend.corpus.duplicates(0.05, conditions)
    assert got == reference_groups(backend, 0.05, conditions)
    assert got[2] == COUNT // 2
    wide = (condition(EQUALS, "10"),)
    assert backend.corpus.duplicates(2.0, wide) == reference_groups(backend, 2.0, wide)
    assert backend.corpus.duplicates(0.05, (condition(EQUALS, "0.1"),))[2] == 3


def test_duplicates_stops_at_max_pairs_and_when_checked(backend: Backend) -> None:
    with pytest.raises(TooManyPairs, match="more than 3 pairs"):
        backend.corpus.duplicates(0.05, max_pairs=3)

    class Gone(Exception):
        pass

    def check() -> None:
        raise Gone

    with pytest.raises(Gone):
        backend.corpus.duplicates(0.05, check=check)


# ---- a collection made before filters --------------------------------------------------------


def test_a_collection_made_before_filters_refuses_them_saying_how_to_migrate(backend: Backend) -> None:
    """The schema of before (metadata as a VARCHAR of JSON): everything else works as it did; Search and
    SearchById with a filter are FAILED_PRECONDITION naming `imgsearch migrate`; Duplicates filters here."""
    milvus_name = backend.collections.milvus_name("old")
    client: Any = MilvusClient(backend.uri)
    ids, vectors, metadata = backend.ids[:300], backend.vectors[:300], backend.metadata[:300]
    try:
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=256)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=DIM)
        schema.add_field("metadata", DataType.VARCHAR, max_length=65535)
        client.create_collection(
            milvus_name, schema=schema, consistency_level="Strong", properties={MODEL_VERSION_PROPERTY: "m1"}
        )
        store = backend.collections.lookup("old")[1]
        fill(store, ids, vectors, metadata)  # written as the text it keeps
        got = store.search(vectors[:2], 5, max_distance=10.0)
        assert_same(got, nearest(ids, vectors, metadata, (), vectors[:2], 5), "unfiltered")
        assert store.get(ids[:3])[0] == list(zip(ids[:3], metadata[:3], strict=True))
        conditions = (Condition("parity", EQUALS, ("even",)),)
        for call in (
            lambda: store.search(vectors[:1], 5, conditions=conditions),
            lambda: store.search_by_id(ids[:1], 5, conditions=conditions),
        ):
            with pytest.raises(FailedPrecondition, match="made before filters") as refused:
                call()
            assert "imgsearch migrate --collection old" in str(refused.value)
        keep = [n for n in range(300) if matches(conditions, metadata[n])]
        expected = duplicate_groups([ids[n] for n in keep], vectors[keep], 3.0)
        assert store.duplicates(3.0, conditions) == (*expected, len(keep))
        assert store.duplicates(3.0) == (*duplicate_groups(ids, vectors, 3.0), 300)
        copied = store.copy(with_vectors=False)
        assert sorted(copied.ids) == sorted(ids)
    finally:
        backend.collections.drop("old")
        client.close()


def test_a_new_collection_keeps_its_metadata_as_json(backend: Backend) -> None:
    client: Any = MilvusClient(backend.uri)
    try:
        fields = client.describe_collection(backend.collections.milvus_name("corpus"))["fields"]
        assert {f["name"]: f["type"] for f in fields} == {
            "id": DataType.VARCHAR,
            "vector": DataType.FLOAT_VECTOR,
            "meta": DataType.JSON,
        }
    finally:
        client.close()
    copied = backend.corpus.copy(with_vectors=False)
    assert dict(zip(copied.ids, copied.metadata(), strict=True)) == dict(
        zip(backend.ids, backend.metadata, strict=True)
    )

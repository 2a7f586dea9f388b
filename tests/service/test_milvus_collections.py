"""Named collections and aliases on Milvus (index_service/milvus_store.py's MilvusCollections), asked
directly, without gRPC: on Milvus Lite, and where marked on the session's Milvus 2.3.5 server too.

The API's behaviour on every backend is tested through gRPC elsewhere; these hold what is Milvus's own:
the mapping onto Milvus names and aliases, a second replica seeing every change at once, the upgrade from
the single collection of before, and an alias moved under running searches."""

from __future__ import annotations

import itertools
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from index_service.store import (
    AlreadyExists,
    CollectionInfo,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Stats,
    StorageUnavailable,
)
from tests.support import MILVUS_MISSING, MILVUS_SERVER_SKIP, MILVUS_SKIP, MilvusLite
from tools.local import free_port
from tools.milvus_server import MilvusServer

pytestmark = MILVUS_SKIP

if not MILVUS_MISSING:
    from pymilvus import DataType, MilvusClient

    from index_service.milvus_store import (
        MODEL_NAME_PROPERTY,
        MODEL_VERSION_PROPERTY,
        MilvusCollections,
        MilvusStore,
        check_prefix,
    )

on_both = pytest.mark.parametrize(
    "milvus", ["lite", pytest.param("server", marks=MILVUS_SERVER_SKIP)], indirect=True
)


@pytest.fixture
def milvus(request: pytest.FixtureRequest) -> MilvusLite | MilvusServer:
    """The session's Milvus Lite file, or (parametrised "server") the session's Milvus server."""
    kind = getattr(request, "param", "lite")
    found: MilvusLite | MilvusServer = request.getfixturevalue(
        "milvus_server" if kind == "server" else "milvus_lite"
    )
    return found


class Opener:
    """MilvusCollections on one fresh prefix, as many as a test asks for (each another replica)."""

    def __init__(self, milvus: MilvusLite | MilvusServer) -> None:
        self.uri = milvus.uri
        self.prefix = milvus.new_collection()  # unique in the session
        self.opened: list[MilvusCollections] = []

    def __call__(self) -> MilvusCollections:
        collections = MilvusCollections(self.uri, self.prefix, max_k=50, timeout_s=30)
        self.opened.append(collections)
        return collections

    def close(self) -> None:
        cleaner = MilvusCollections(self.uri, self.prefix, timeout_s=30)
        try:
            cleaner.remove_everything()
        finally:
            cleaner.close()
            for collections in self.opened:
                collections.close()


@pytest.fixture
def opener(milvus: MilvusLite | MilvusServer) -> Iterator[Opener]:
    made = Opener(milvus)
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def collections(opener: Opener) -> MilvusCollections:
    return opener()


def items(tag: str, count: int = 5, dim: int = 8, seed: int = 0) -> tuple[list[str], np.ndarray]:
    vectors = np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)
    return [f"{tag}{n}" for n in range(count)], vectors


def fill(collections: MilvusCollections, name: str, tag: str, count: int = 5, seed: int = 0) -> None:
    collections.create(name)
    ids, vectors = items(tag, count, seed=seed)
    assert collections.lookup(name)[1].upsert(ids, vectors, (), "m1") == count


def raw_client(uri: str) -> Any:
    return MilvusClient(uri, timeout=30)


def test_names_map_to_milvus_names_and_back(collections: MilvusCollections) -> None:
    prefix = collections.prefix
    # Every name of up to four characters of "a", "d", "u", "_" and "-" that starts with "a": every way
    # the escape could be confused.
    names = ["".join(("a", *rest)) for size in range(4) for rest in itertools.product("adu_-", repeat=size)]
    names += ["a-b", "a_b", "0-9_z", "x" * 64, "default0", "default-"]
    milvus_names = [collections.milvus_name(n) for n in names]
    assert len(set(milvus_names)) == len(names)
    for name, milvus_name in zip(names, milvus_names, strict=True):
        assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", milvus_name) and len(milvus_name) <= 255
        assert collections.our_name(milvus_name) == name
    assert collections.milvus_name("a-b") == f"{prefix}__a_db"
    assert collections.milvus_name("a_b") == f"{prefix}__a__b"
    assert collections.milvus_name("default") == prefix
    assert collections.our_name(prefix) == "default"
    for foreign in [
        "other",
        f"{prefix}_a",
        f"{prefix}__",
        f"{prefix}__a_",
        f"{prefix}__a_xb",
        f"{prefix}__A",
    ]:
        assert collections.our_name(foreign) is None, foreign
    assert collections.our_name(f"{prefix}__default") is None  # "default" is the prefix itself
    assert collections.our_name(f"{prefix}___a") is None  # a name does not begin with "_"
    for bad in ["", "1abc", "a-b", "a b", "x" * 200]:
        with pytest.raises(ValueError, match="Milvus collection"):
            check_prefix(bad)


@on_both
def test_create_list_and_drop(collections: MilvusCollections) -> None:
    assert collections.collections() == [CollectionInfo("default", 0, 0, "", "", 0)]
    assert collections.create("blue", "fashion") == CollectionInfo("blue", 0, 0, "fashion", "", 0)
    collections.create("a-b")
    collections.create("a_b")
    listed = collections.collections()
    assert [i.name for i in listed] == ["a-b", "a_b", "blue", "default"]
    assert listed[2] == CollectionInfo("blue", 0, 0, "fashion", "", 0)
    name, store = collections.lookup("blue")
    assert name == "blue" and store.stats() == Stats(0, 0, "", 0, "fashion")
    ids, vectors = items("b", 10)
    assert store.upsert(ids, vectors, (), "m1") == 10
    assert store.stats() == Stats(10, 8, "m1", 320, "fashion")
    assert [m.id for m in store.search(vectors[:1], 1)[0]] == ["b0"]
    assert collections.lookup("")[0] == "default"
    assert collections.lookup("")[1].stats().count == 0  # its own collection
    listed = collections.collections()
    assert listed[2] == CollectionInfo("blue", 10, 8, "fashion", "m1", 320)
    assert collections.total() == Stats(10, 0, "", 320, "")
    client = raw_client(collections.uri)
    try:
        prefix = collections.prefix
        mine = {n for n in client.list_collections() if n.startswith(prefix)}
        assert mine == {f"{prefix}__a_db", f"{prefix}__a__b", f"{prefix}__blue"}  # default: not yet made
    finally:
        client.close()
    assert collections.drop("blue") == 10
    assert collections.drop("a-b") == 0
    with pytest.raises(NotFound, match="'blue'"):
        collections.lookup("blue")
    with pytest.raises(NotFound, match="'blue'"):
        store.stats()  # a store looked up before the drop
    assert [i.name for i in collections.collections()] == ["a_b", "default"]


def test_names_and_errors(collections: MilvusCollections) -> None:
    for bad in ["A", "-a", "_a", "a b", "a.b", "a" * 65, "ü", "a\n"]:
        calls: list[tuple[str, Callable[..., object], tuple[str, ...]]] = [
            ("collection", collections.create, (bad,)),
            ("collection", collections.drop, (bad,)),
            ("collection", collections.set_alias, ("x", bad)),
            ("collection", collections.lookup, (bad,)),
            ("alias", collections.set_alias, (bad, "default")),
            ("alias", collections.drop_alias, (bad,)),
        ]
        for what, method, args in calls:
            with pytest.raises(InvalidArgument, match=rf"{what} name .* is not valid"):
                method(*args)
    with pytest.raises(InvalidArgument):
        collections.create("")
    with pytest.raises(InvalidArgument):
        collections.drop_alias("")
    with pytest.raises(InvalidArgument):
        collections.set_alias("x", "")  # a name is said here: "" means default only in a data call
    collections.create("blue")
    collections.set_alias("live", "blue")
    for taken in ("blue", "default"):
        with pytest.raises(AlreadyExists, match=f"a collection named '{taken}' exists"):
            collections.create(taken)
        with pytest.raises(AlreadyExists, match=f"a collection is named '{taken}'"):
            collections.set_alias(taken, "blue")
    with pytest.raises(AlreadyExists, match=r"'live' is an alias \(of 'blue'\)"):
        collections.create("live")
    for call in (
        lambda: collections.set_alias("x", "nope"),
        lambda: collections.lookup("nope"),
        lambda: collections.drop("nope"),
        lambda: collections.drop_alias("nope"),
    ):
        with pytest.raises(NotFound, match="'nope'"):
            call()
    with pytest.raises(NotFound, match=r"'live' is an alias \(of 'blue'\), not a collection"):
        collections.set_alias("other", "live")
    with pytest.raises(NotFound, match=r"'live' is an alias \(of 'blue'\), not a collection"):
        collections.drop("live")
    for collection in ("blue", "default"):
        with pytest.raises(NotFound, match=f"no alias is named '{collection}'"):
            collections.drop_alias(collection)
    collections.set_alias("main", "blue")
    with pytest.raises(FailedPrecondition, match=r"the alias 'live' points at it \(and 1 more\)"):
        collections.drop("blue")
    assert collections.drop_alias("main") == "blue"
    with pytest.raises(FailedPrecondition, match="'default' collection cannot be dropped"):
        collections.drop("default")
    assert collections.aliases() == {"live": "blue"}
    assert [(i.name, i.aliases) for i in collections.collections()] == [("blue", ("live",)), ("default", ())]


@on_both
def test_aliases_are_set_moved_and_dropped_for_every_replica(opener: Opener) -> None:
    collections, other = opener(), opener()  # another replica on the same Milvus
    fill(collections, "blue", "b")
    fill(collections, "green", "g", seed=1)
    assert collections.set_alias("live", "blue") == ""
    name, store = other.lookup("live")
    assert name == "blue"
    assert {m.id[0] for m in store.search(items("q", 3)[1], 5)[0]} == {"b"}
    assert collections.set_alias("live", "green") == "blue"
    name, store = other.lookup("live")  # nothing cached: the other replica sees the move at once
    assert name == "green"
    assert {m.id[0] for m in store.search(items("q", 3)[1], 5)[0]} == {"g"}
    assert other.set_alias("live", "green") == "green"
    collections.set_alias("old", "blue")
    collections.set_alias("home", "default")  # made in Milvus (with no dim yet) to be named
    assert other.aliases() == {"home": "default", "live": "green", "old": "blue"}
    assert [(i.name, i.aliases) for i in other.collections()] == [
        ("blue", ("old",)),
        ("default", ("home",)),
        ("green", ("live",)),
    ]
    assert other.lookup("home")[0] == "default"
    assert other.lookup("home")[1].stats() == Stats(0, 0, "", 0, "")
    assert collections.drop_alias("old") == "blue"
    assert other.drop("blue") == 5
    assert collections.drop_alias("live") == "green"
    with pytest.raises(NotFound, match="'live'"):
        other.lookup("live")
    assert other.aliases() == {"home": "default"}


def test_the_model_name_is_recorded_and_kept(opener: Opener) -> None:
    collections = opener()
    collections.create("fash", "fashion")
    _, store = collections.lookup("fash")
    ones = np.ones((1, 4), np.float32)
    store.upsert(["a"], ones, (), "m1")  # no model name said: the collection's stays
    assert store.stats() == Stats(1, 4, "m1", 16, "fashion")
    with pytest.raises(
        FailedPrecondition, match="from model 'digits', the collection 'fash' is filled by model 'fashion'"
    ):
        store.upsert(["b"], ones, (), "m1", "digits")
    store.upsert(["b"], ones, (), "m1", "fashion")
    with pytest.raises(FailedPrecondition, match="model version 'm2'"):
        store.upsert(["c"], ones, (), "m2", "fashion")
    with pytest.raises(InvalidArgument, match="dim 8"):
        store.upsert(["c"], np.ones((1, 8), np.float32), (), "m1", "fashion")
    assert store.stats() == Stats(2, 4, "m1", 32, "fashion")
    _, default = collections.lookup("")
    default.upsert(["x"], ones, (), "m1")
    assert default.stats().model_name == ""
    default.upsert(["y"], ones, (), "m1", "digits")  # none known until now: recorded
    assert default.stats() == Stats(2, 4, "m1", 32, "digits")
    assert default.copy().model_name == "digits"
    again = opener()  # kept in Milvus: a restarted service or another replica sees them
    assert [(i.name, i.model_name, i.count) for i in again.collections()] == [
        ("default", "digits", 2),
        ("fash", "fashion", 2),
    ]
    assert again.total() == Stats(4, 4, "m1", 64, "digits")
    # Emptied, a collection takes another model version and dim, never another model.
    assert store.delete(["a", "b"]) == (2, 0)
    with pytest.raises(FailedPrecondition, match="is filled by model 'fashion'"):
        again.lookup("fash")[1].upsert(["c"], ones, (), "m2", "digits")
    again.lookup("fash")[1].upsert(["c"], np.ones((1, 8), np.float32), (), "m2", "fashion")
    assert store.stats() == Stats(1, 8, "m2", 32, "fashion")
    empty = again.create("empty", "fashion")
    assert empty.model_name == "fashion"
    with pytest.raises(FailedPrecondition, match="is filled by model 'fashion'"):
        again.lookup("empty")[1].upsert(["c"], ones, (), "m1", "digits")


@on_both
def test_a_collection_made_before_named_collections_is_the_default(opener: Opener) -> None:
    """Today's deployments: the one collection MilvusStore made (as commit 12fec39 made it: no model
    name, no dim property) is `default`, with nothing lost."""
    ids, vectors = items("old", 20, dim=4)
    client = raw_client(opener.uri)
    try:
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=256)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=4)
        schema.add_field("metadata", DataType.VARCHAR, max_length=65535)
        client.create_collection(
            opener.prefix,
            schema=schema,
            consistency_level="Strong",
            properties={MODEL_VERSION_PROPERTY: "m1"},
        )
        index_params = client.prepare_index_params()
        index_params.add_index(field_name="vector", index_type="FLAT", metric_type="L2")
        client.create_index(opener.prefix, index_params, sync=False)
        client.load_collection(opener.prefix)
        rows = [
            {"id": i, "vector": v.tolist(), "metadata": f'{{"n":"{n}"}}'}
            for n, (i, v) in enumerate(zip(ids, vectors, strict=True))
        ]
        client.upsert(opener.prefix, rows)
        collections = opener()
        assert collections.collections() == [CollectionInfo("default", 20, 4, "", "m1", 320)]
        name, store = collections.lookup("")
        assert name == "default"
        found = store.search(vectors[3:4], 2)[0]
        assert found[0].id == "old3" and found[0].metadata == {"n": "3"}
        store.upsert(["new"], np.ones((1, 4), np.float32), (), "m1", "digits")
        assert store.stats() == Stats(21, 4, "m1", 336, "digits")
        collections.create("next")
        collections.set_alias("prod", "default")
        assert [(i.name, i.count, i.aliases) for i in collections.collections()] == [
            ("default", 21, ("prod",)),
            ("next", 0, ()),
        ]
        assert collections.lookup("prod")[1].get(["old7"])[0] == [("old7", {"n": "7"})]
        assert client.describe_collection(opener.prefix)["properties"][MODEL_NAME_PROPERTY] == "digits"
        alone = MilvusStore(opener.uri, opener.prefix)  # the single-collection store reads it as before
        try:
            assert alone.stats() == Stats(21, 4, "m1", 336, "digits")
        finally:
            alone.close()
    finally:
        client.close()


@on_both
def test_an_empty_aliased_collection_keeps_its_aliases_when_its_dim_is_set(opener: Opener) -> None:
    """A collection made with no dim is made again by its first vectors, with its aliases; so is an
    emptied one given another dim."""
    collections = opener()
    collections.create("v2", "digits")
    collections.set_alias("staging", "v2")
    collections.set_alias("home", "default")
    ids, vectors = items("v", 5, dim=8)
    collections.lookup("staging")[1].upsert(ids, vectors, (), "m1")
    name, store = collections.lookup("staging")
    assert name == "v2" and store.stats() == Stats(5, 8, "m1", 160, "digits")
    assert [m.id for m in store.search(vectors[2:3], 1)[0]] == ["v2"]
    collections.lookup("home")[1].upsert(["x"], np.ones((1, 4), np.float32), (), "m1")
    assert collections.lookup("home")[1].stats().count == 1
    assert store.delete(ids) == (5, 0)
    collections.lookup("staging")[1].upsert(["y"], np.ones((1, 16), np.float32), (), "m2")
    assert collections.aliases() == {"home": "default", "staging": "v2"}
    assert collections.lookup("staging")[1].stats() == Stats(1, 16, "m2", 64, "digits")


@on_both
def test_an_alias_moved_while_searches_run_through_it(opener: Opener) -> None:
    """Four threads search through an alias while another replica flips it between two collections for
    about 3 s: no call fails, and every reply is all from one collection, the one the lookup named."""
    collections, flipper = opener(), opener()
    fill(collections, "blue", "b", 50)
    fill(collections, "green", "g", 50, seed=1)
    collections.set_alias("live", "blue")
    queries = items("q", 3, seed=2)[1]
    stop = threading.Event()
    errors: list[str] = []
    answered: list[list[str]] = [[] for _ in range(4)]

    def search(seen: list[str]) -> None:
        while not stop.is_set():
            try:
                name, store = collections.lookup("live")
                rows = store.search(queries, 5)
                tags = {m.id[0] for row in rows for m in row}
                if tags != {name[0]} or any(len(row) != 5 for row in rows):
                    errors.append(f"{name}: {[[m.id for m in row] for row in rows]}")
                seen.append(name)
            except Exception as error:
                errors.append(repr(error))

    threads = [threading.Thread(target=search, args=(seen,)) for seen in answered]
    for thread in threads:
        thread.start()
    flips = 0
    deadline = time.monotonic() + 3
    try:
        while time.monotonic() < deadline:
            assert flipper.set_alias("live", "green" if flips % 2 == 0 else "blue") == (
                "blue" if flips % 2 == 0 else "green"
            )
            flips += 1
            time.sleep(0.01)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert errors == []
    assert flips > 20
    seen = [name for names in answered for name in names]
    assert {"blue", "green"} <= set(seen) and all(answered)


def test_an_unreachable_or_closed_milvus_is_unavailable(collections: MilvusCollections) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(StorageUnavailable, match=f"Milvus at {re.escape(uri)} is not reachable"):
        MilvusCollections(uri, timeout_s=0.2)
    _, store = collections.lookup("")
    collections.close()
    for call in (lambda: collections.create("x"), lambda: collections.lookup("x"), store.stats):
        with pytest.raises(StorageUnavailable, match="closed"):
            call()

"""FAISS collections and aliases without gRPC: the rules, the atomic alias move, durability across
reopening (log only, snapshot, both), the old single-collection data dir, and the log's record kinds."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from index_service.catalog import Catalog
from index_service.durable import DurableStore
from index_service.snapshot import snapshots
from index_service.store import (
    AlreadyExists,
    CreateCollection,
    Delete,
    DropAlias,
    DropCollection,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    SetAlias,
    Upsert,
)
from index_service.wal import decode, encode

DATA = Path(__file__).parent.parent / "data"


def vectors(count: int, dim: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)


def test_default_always_exists_and_names_are_checked() -> None:
    catalog = Catalog()
    assert [c.name for c in catalog.collections()] == ["default"]
    assert catalog.lookup("")[0] == "default" and catalog.lookup("default")[0] == "default"
    for bad in ("", "Upper", "-lead", "_lead", "a" * 65, "sp ace", "dot.ted", "ümlaut"):
        with pytest.raises(InvalidArgument, match="not valid"):
            catalog.create(bad)
    assert catalog.create("a" * 64).name == "a" * 64
    assert catalog.create("0-digits_and-dashes").name == "0-digits_and-dashes"
    with pytest.raises(InvalidArgument, match="alias name 'Bad' is not valid"):
        catalog.set_alias("Bad", "default")


def test_the_errors_name_what_was_wrong() -> None:
    catalog = Catalog()
    catalog.create("digits", "default")
    with pytest.raises(AlreadyExists, match="'digits' exists already"):
        catalog.create("digits")
    with pytest.raises(NotFound, match="'nope'"):
        catalog.lookup("nope")
    with pytest.raises(NotFound, match="no collection is named 'nope'"):
        catalog.drop("nope")
    with pytest.raises(NotFound, match="no collection is named 'nope'"):
        catalog.set_alias("live", "nope")
    assert catalog.set_alias("live", "digits") == ""
    with pytest.raises(AlreadyExists, match="'live' is an alias"):
        catalog.create("live")
    with pytest.raises(AlreadyExists, match="a collection is named 'digits'"):
        catalog.set_alias("digits", "default")
    with pytest.raises(NotFound, match=r"'live' is an alias .* not a collection"):
        catalog.set_alias("other", "live")
    with pytest.raises(FailedPrecondition, match="the alias 'live' points at it"):
        catalog.drop("digits")
    with pytest.raises(NotFound, match="'live' is an alias"):
        catalog.drop("live")
    with pytest.raises(FailedPrecondition, match="'default' collection cannot be dropped"):
        catalog.drop("default")
    with pytest.raises(NotFound, match="no alias is named 'gone'"):
        catalog.drop_alias("gone")
    assert catalog.drop_alias("live") == "digits"
    assert catalog.drop("digits") == 0


def test_a_collection_keeps_its_model_dim_and_version() -> None:
    catalog = Catalog()
    catalog.create("clothes", "fashion")
    _, clothes = catalog.lookup("clothes")
    with pytest.raises(
        FailedPrecondition, match="from model 'default', the collection 'clothes' is filled by"
    ):
        clothes.upsert(["a"], vectors(1), (), "v-digits", "default")
    clothes.upsert(["a"], vectors(1), (), "v-fashion", "fashion")
    with pytest.raises(InvalidArgument, match="dim 8, the collection 'clothes' holds dim 4"):
        clothes.upsert(["b"], vectors(1, 8), (), "v-fashion", "fashion")
    with pytest.raises(FailedPrecondition, match="model version 'v2'"):
        clothes.upsert(["b"], vectors(1), (), "v2", "fashion")
    _, default = catalog.lookup("")
    default.upsert(["d"], vectors(1, 8), (), "v-digits", "default")  # the first vectors name its model
    infos = {c.name: c for c in catalog.collections()}
    assert (infos["default"].model_name, infos["default"].dim, infos["default"].count) == ("default", 8, 1)
    assert (infos["clothes"].model_name, infos["clothes"].model_version) == ("fashion", "v-fashion")
    with pytest.raises(FailedPrecondition, match="filled by model 'default'"):
        default.upsert(["e"], vectors(1, 8), (), "v-digits", "fashion")
    total = catalog.total()
    assert total.count == 2 and total.bytes_used == sum(c.bytes_used for c in infos.values())


def test_a_store_held_across_its_drop_refuses_writes_and_still_reads() -> None:
    catalog = Catalog()
    catalog.create("old")
    _, old = catalog.lookup("old")
    old.upsert(["a"], vectors(1), (), "v")
    assert catalog.drop("old") == 1
    with pytest.raises(NotFound, match="'old' was dropped"):
        old.upsert(["b"], vectors(1), (), "v")
    assert old.search(vectors(1), 1)[0][0].id == "a"  # a search that looked it up before still answers
    catalog.create("old")  # the name is free again, empty
    assert catalog.lookup("old")[1].stats().count == 0


def test_an_alias_moves_atomically_under_concurrent_lookups() -> None:
    catalog = Catalog()
    for name, value in (("blue", 1.0), ("green", 2.0)):
        catalog.create(name)
        catalog.lookup(name)[1].upsert(
            [f"{name}-{n}" for n in range(50)], np.full((50, 4), value, np.float32)
        )
    catalog.set_alias("live", "blue")
    stop = threading.Event()
    seen: list[set[str]] = []
    failures: list[BaseException] = []

    def search() -> None:
        while not stop.is_set():
            try:
                name, store = catalog.lookup("live")
                prefixes = {m.id.split("-")[0] for m in store.search(np.zeros((1, 4), np.float32), 50)[0]}
                assert prefixes == {name}
                seen.append(prefixes)
            except BaseException as error:
                failures.append(error)
                return

    threads = [threading.Thread(target=search) for _ in range(4)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 1.0
    flips = 0
    while time.monotonic() < deadline:
        catalog.set_alias("live", "green" if flips % 2 == 0 else "blue")
        flips += 1
    stop.set()
    for thread in threads:
        thread.join()
    assert not failures and flips > 10
    assert {frozenset(s) for s in seen} == {frozenset({"blue"}), frozenset({"green"})}


def history(durable: DurableStore) -> None:
    """Every kind of change, in an order whose end state says whether each was kept."""
    catalog = durable.catalog
    catalog.create("digits", "default")
    catalog.create("clothes", "fashion")
    catalog.create("scratch")
    catalog.lookup("digits")[1].upsert(["d1", "d2"], vectors(2), [{"label": "1"}, {}], "vd", "default")
    catalog.lookup("")[1].upsert(["x"], vectors(1, 8), (), "vx")
    catalog.set_alias("live", "digits")
    catalog.lookup("live")[1].upsert(["d3"], vectors(1, seed=3), (), "vd", "default")
    catalog.lookup("clothes")[1].upsert(["c1"], vectors(1, 6), (), "vf", "fashion")
    catalog.set_alias("live", "clothes")
    catalog.set_alias("spare", "digits")
    catalog.drop_alias("spare")
    catalog.lookup("digits")[1].delete(["d2"])
    catalog.drop("scratch")


def state_of(catalog: Catalog) -> tuple[object, ...]:
    infos = tuple(
        (c.name, c.count, c.dim, c.model_name, c.model_version, c.aliases) for c in catalog.collections()
    )
    items = {}
    for info in catalog.collections():
        copied = catalog.lookup(info.name)[1].copy()
        items[info.name] = sorted(zip(copied.ids, copied.vectors.tobytes().hex(), strict=False))
    return infos, tuple(catalog.aliases().items()), repr(items)


EXPECTED = (
    ("clothes", 1, 6, "fashion", "vf", ("live",)),
    ("default", 1, 8, "", "vx", ()),
    ("digits", 2, 4, "default", "vd", ()),
)


@pytest.mark.parametrize("snapshot_at", [None, 0, 5, 12])
def test_every_change_survives_reopening(tmp_path: Path, snapshot_at: int | None) -> None:
    durable = DurableStore(tmp_path, snapshot_every_ops=10**9)
    try:
        original = durable.snapshot
        calls = iter(range(100))
        if snapshot_at is not None:
            # Snapshot after the `snapshot_at`-th change: the rest stays in the log only.
            journal = durable._journal

            def counting(operation):  # type: ignore[no-untyped-def]
                lsn = journal(operation)
                if next(calls) == snapshot_at:
                    threading.Thread(target=original).start()  # it waits for this write to finish
                return lsn

            durable.catalog.journal = counting
        history(durable)
        deadline = time.monotonic() + 10
        while snapshot_at is not None and not snapshots(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert bool(snapshots(tmp_path)) == (snapshot_at is not None)
        before = state_of(durable.catalog)
        assert before[0] == EXPECTED and before[1] == (("live", "clothes"),)
    finally:
        durable.close(snapshot=False)  # as a kill would leave it
    reopened = DurableStore(tmp_path)
    try:
        assert state_of(reopened.catalog) == before
        assert reopened.catalog.lookup("live")[0] == "clothes"
        reopened.catalog.lookup("digits")[1].upsert(["d4"], vectors(1), (), "vd", "default")
        reopened.snapshot()
        after = state_of(reopened.catalog)
    finally:
        reopened.close()
    again = DurableStore(tmp_path)
    try:
        assert state_of(again.catalog) == after
    finally:
        again.close()


def test_a_data_dir_of_the_version_before_collections_opens_as_default(tmp_path: Path) -> None:
    """tests/data/legacy-data-dir was written by the version before collections (commit 12fec39): a
    snapshot of 20 items, then 5 upserts and 2 deletes in the log only."""
    data_dir = tmp_path / "data"
    shutil.copytree(DATA / "legacy-data-dir", data_dir)
    expected = np.load(DATA / "legacy-data-dir-expected.npz")
    durable = DurableStore(data_dir)
    try:
        assert [c.name for c in durable.catalog.collections()] == ["default"]
        stats = durable.catalog.lookup("")[1].stats()
        assert (stats.count, stats.dim, stats.model_version) == (23, 8, "v-legacy")
        ids = [str(i) for i in expected["ids"]]
        items, found, missing = durable.store.get(ids)
        assert missing == ["digit/0.png", "digit/1.png"]
        np.testing.assert_array_equal(found, expected["vectors"][2:])
        assert dict(items)["digit/5.png"] == {"label": "5", "source": "/data/5.png"}
        durable.catalog.create("clothes", "fashion")
        durable.snapshot()  # now in the new format
    finally:
        durable.close()
    reopened = DurableStore(data_dir)
    try:
        assert [c.name for c in reopened.catalog.collections()] == ["clothes", "default"]
        assert reopened.store.stats().count == 23
    finally:
        reopened.close()


def test_every_record_kind_round_trips_and_old_records_are_of_default() -> None:
    for operation in (
        CreateCollection("clothes", "fashion"),
        DropCollection("clothes"),
        SetAlias("live", "clothes"),
        DropAlias("live"),
        Delete(("a", "b"), "clothes"),
    ):
        assert decode(encode(operation)) == operation
    upsert = Upsert(("a",), vectors(1), ({"k": "v"},), "v1", "fashion", "clothes")
    back = decode(encode(upsert))
    assert isinstance(back, Upsert) and (back.collection, back.model_name) == ("clothes", "fashion")
    old_upsert = b'U\x46\x00\x00\x00{"ids": ["a"], "metadata": [{}], "model_version": "v1", "dim": 1}  '
    old_upsert = old_upsert[:1] + len(old_upsert[5:-2]).to_bytes(4, "little") + old_upsert[5:-2]
    decoded = decode(old_upsert + np.float32(1.5).tobytes())
    assert isinstance(decoded, Upsert) and (decoded.collection, decoded.model_name) == ("default", "")
    old_delete = b'{"ids": ["a"]}'
    assert decode(b"D" + len(old_delete).to_bytes(4, "little") + old_delete) == Delete(("a",), "default")

"""Collections, aliases and several models through the real services, on every index backend: the rules
and their gRPC codes, two models side by side, an alias moved under searching threads, the evaluation gate
on the move, reindexing into a collection of another model, and the CLI's exact interface."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import grpc
import numpy as np
import pytest

from encoder_service.service import EncoderService
from imgsearch.cli import main
from imgsearch.client import ImageSearch, IndexClient, ModelNotServed, ServiceError
from index_service.service import IndexService
from tests.support import (
    FAST,
    address,
    every_backend,
    mnist_sample,
    png,
    serve,
    start_encoder,
    start_index,
    write_digits,
)


@pytest.fixture(scope="module")
def encoder() -> Iterator[EncoderService]:
    yield from serve(start_encoder("--models", "default,fashion,tutorial"))


@pytest.fixture
def search(encoder: EncoderService, index_service: IndexService) -> Iterator[ImageSearch]:
    with ImageSearch(address(encoder), address(index_service), 60) as client:
        yield client


def cli(capsys: pytest.CaptureFixture[str], search: ImageSearch, *args: str) -> tuple[int, str, str]:
    code = main(["--encoder", search.encoder.address, "--index", search.index.address, *args])
    out, err = capsys.readouterr()
    return code, out, err


def code_of(call) -> grpc.StatusCode | None:  # type: ignore[no-untyped-def]
    with pytest.raises(ServiceError) as refused:
        call()
    return refused.value.code


DIGITS = [png(d) for d in mnist_sample(12)[0]]


@every_backend
def test_the_rules_and_their_codes(search: ImageSearch) -> None:
    index = search.index
    assert [c.name for c in index.list_collections()] == ["default"]
    created = index.create_collection("clothes", "fashion")
    assert (created.name, created.count, created.model_name) == ("clothes", 0, "fashion")
    assert code_of(lambda: index.create_collection("clothes")) == grpc.StatusCode.ALREADY_EXISTS
    assert code_of(lambda: index.create_collection("Bad Name")) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: index.stats(collection="nope")) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: index.search(np.zeros((1, 128), np.float32), collection="nope")) == (
        grpc.StatusCode.NOT_FOUND
    )
    assert code_of(lambda: index.set_alias("live", "nope")) == grpc.StatusCode.NOT_FOUND
    assert index.set_alias("live", "clothes") == ""
    assert code_of(lambda: index.set_alias("clothes", "default")) == grpc.StatusCode.ALREADY_EXISTS
    assert code_of(lambda: index.create_collection("live")) == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(ServiceError, match="alias 'live' points at it") as refused:
        index.drop_collection("clothes")
    assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(lambda: index.drop_collection("default")) == grpc.StatusCode.FAILED_PRECONDITION
    assert index.stats(collection="live").collection == "clothes"
    assert index.list_aliases() == {"live": "clothes"}
    assert [(c.name, c.aliases) for c in index.list_collections()] == [("clothes", ["live"]), ("default", [])]
    assert index.drop_alias("live") == "clothes"
    assert code_of(lambda: index.drop_alias("live")) == grpc.StatusCode.NOT_FOUND
    assert index.drop_collection("clothes") == 0
    assert [c.name for c in index.list_collections()] == ["default"]


@every_backend
def test_two_collections_with_two_models_in_one_stack(search: ImageSearch, encoder: EncoderService) -> None:
    search.index.create_collection("clothes", "fashion")
    ids = [f"img/{n}.png" for n in range(len(DIGITS))]
    search.add(ids, DIGITS)  # default: its first vectors record the encoder's default model
    search.add(ids, DIGITS, collection="clothes")
    infos = {c.name: c for c in search.index.list_collections()}
    assert (infos["default"].model_name, infos["clothes"].model_name) == ("default", "fashion")
    assert infos["default"].model_version == encoder.runtimes["default"].model_version
    assert infos["clothes"].model_version == encoder.runtimes["fashion"].model_version
    for collection, model in (("default", "default"), ("clothes", "fashion")):
        expected = search.encoder.embed(DIGITS, model).vectors
        items, _ = search.index.get(ids, with_vectors=True, collection=collection)
        np.testing.assert_allclose(
            np.stack([i.vector for i in items if i.vector is not None]), expected, atol=1e-5
        )
        results = search.search(DIGITS[:3], 1, collection=collection)  # embedded by that model again
        assert [(row[0].id, round(row[0].distance, 3)) for row in results] == [(i, 0.0) for i in ids[:3]]
    # vectors of another model are refused, with what to do
    fashion = search.encoder.embed(DIGITS[:1], "fashion")
    with pytest.raises(ServiceError, match="filled by model 'default'") as refused:
        search.index.upsert(["x"], fashion.vectors, (), fashion.model_version, model_name="fashion")
    assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_a_collection_whose_model_no_encoder_serves_is_named(search: ImageSearch) -> None:
    search.index.create_collection("cats", "cats-v1")
    with pytest.raises(ModelNotServed, match="collection 'cats' is filled by the model 'cats-v1'") as refused:
        search.search(DIGITS[:1], collection="cats")
    assert "default, fashion, tutorial" in str(refused.value)


# How long the alias is moved back and forth under the searching threads (the fast loop: 2 s).
FLIP_SECONDS = {"faiss": 2.0 if FAST else 10.0, "milvus": 2.0 if FAST else 4.0, "milvus-server": 4.0}


@every_backend
def test_an_alias_moved_while_four_threads_search_through_it(search: ImageSearch, backend: str) -> None:
    """Two collections of distinct contents (and models); every search through the alias gets one or the
    other whole, never an error or a mix."""
    index = search.index
    index.create_collection("blue", "default")
    index.create_collection("green", "fashion")
    ids = [f"d{n}" for n in range(len(DIGITS))]
    search.add([f"blue/{i}" for i in ids], DIGITS, collection="blue")
    search.add([f"green/{i}" for i in ids], DIGITS, collection="green")
    index.set_alias("live", "blue")
    stop = threading.Event()
    answers: list[str] = []
    failures: list[BaseException] = []

    def searcher() -> None:
        with ImageSearch(search.encoder.address, index.address, 30, collection="live") as mine:
            while not stop.is_set():
                try:
                    rows = mine.search(DIGITS[:2], 5)
                    prefixes = {m.id.split("/")[0] for row in rows for m in row}
                    assert len(prefixes) == 1 and all(len(row) == 5 for row in rows), prefixes
                    answers.append(prefixes.pop())
                except BaseException as error:
                    failures.append(error)
                    return

    threads = [threading.Thread(target=searcher) for _ in range(4)]
    for thread in threads:
        thread.start()
    flips, deadline = 0, time.monotonic() + FLIP_SECONDS[backend]
    while time.monotonic() < deadline:
        index.set_alias("live", "green" if flips % 2 == 0 else "blue")
        flips += 1
        time.sleep(0.02)
    stop.set()
    for thread in threads:
        thread.join()
    assert not failures, failures[0]
    assert flips > 20 and len(answers) > 40 and set(answers) == {"blue", "green"}


@pytest.fixture(scope="module")
def queries(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_digits(tmp_path_factory.mktemp("queries"), 150, start=2000)


def test_the_gate_refuses_a_worse_collection_and_accepts_a_better_one(
    search: ImageSearch, tmp_path: Path, queries: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = write_digits(tmp_path / "base", 400)
    for name, model in (("digits-tutorial", "tutorial"), ("digits-v2", "default")):
        assert cli(capsys, search, "collections", "create", name, "--model", model)[0] == 0
        code, out, _ = cli(capsys, search, "index", "--collection", name, str(base), "--no-progress")
        assert code == 0 and f"the collection '{name}' now holds 400" in out, out
    assert cli(capsys, search, "aliases", "set", "digits", "digits-tutorial")[0] == 0
    # the better one passes the gate: both figures are printed, the alias moves
    code, out, err = cli(capsys, search, "aliases", "set", "digits", "digits-v2", "--if-better", str(queries))
    assert code == 0, err
    figures = {
        line.split()[0]: float(line.split("P@10 ")[1].split()[0])
        for line in out.splitlines()
        if "P@10" in line
    }
    assert (
        set(figures) == {"digits-v2", "digits-tutorial"} and figures["digits-v2"] > figures["digits-tutorial"]
    )
    assert search.index.list_aliases() == {"digits": "digits-v2"}
    # the worse one is refused: exit 1, both figures, the alias stays
    code, out, err = cli(
        capsys, search, "aliases", "set", "digits", "digits-tutorial", "--if-better", str(queries)
    )
    assert code == 1 and "refused" in err and "digits-tutorial" in out and "digits-v2" in out
    assert search.index.list_aliases() == {"digits": "digits-v2"}


def test_reindex_into_a_collection_of_another_model_then_switch(
    search: ImageSearch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = write_digits(tmp_path / "base", 30)
    assert cli(capsys, search, "collections", "create", "photos-v1", "--model", "tutorial")[0] == 0
    assert cli(capsys, search, "aliases", "set", "photos", "photos-v1")[0] == 0
    code, out, err = cli(capsys, search, "index", "--collection", "photos", str(base), "--no-progress")
    assert code == 0 and "the collection 'photos-v1' now holds 30" in out, (out, err)
    assert cli(capsys, search, "collections", "create", "photos-v2", "--model", "default")[0] == 0
    code, out, err = cli(
        capsys, search, "reindex", "--collection", "photos", "--to-collection", "photos-v2", "--no-progress"
    )
    assert code == 0 and "reindexed 30 of 30 items" in out and "collection 'photos-v2'" in out, (out, err)
    assert cli(capsys, search, "aliases", "set", "photos", "photos-v2")[0] == 0
    code, out, _ = cli(capsys, search, "stats", "--collection", "photos", "--json")
    stats = json.loads(out)
    assert (stats["collection"], stats["model_name"], stats["count"]) == ("photos-v2", "default", 30)
    query = next((base / "3").glob("*.png"))
    code, out, _ = cli(capsys, search, "search", "--collection", "photos", str(query), "--json", "-k", "1")
    assert code == 0 and json.loads(out)["results"][0]["distance"] == pytest.approx(0, abs=1e-3)
    # reindexing a collection into itself is refused
    code, _, err = cli(capsys, search, "reindex", "--collection", "photos", "--to-collection", "photos-v2")
    assert code == 2 and "is the collection being reindexed" in err


def test_the_cli_interface(search: ImageSearch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = write_digits(tmp_path / "base", 10)
    code, out, _ = cli(capsys, search, "collections", "create", "clothes", "--model", "fashion")
    assert code == 0 and "created the collection 'clothes'" in out
    code, _, err = cli(capsys, search, "collections", "create", "clothes", "--model", "fashion")
    assert code == 2 and "ALREADY_EXISTS" in err and "'clothes' exists already" in err
    code, _, err = cli(capsys, search, "collections", "create", "Bad!", "--model", "fashion")
    assert code == 2 and "INVALID_ARGUMENT" in err and "[a-z0-9][a-z0-9_-]{0,63}" in err
    code, _, err = cli(capsys, search, "collections", "create", "cats", "--model", "cats-v1")
    assert code == 0 and "does not serve the model 'cats-v1'" in err  # a warning: the encoder may change
    code, out, _ = cli(capsys, search, "index", "--collection", "clothes", str(base), "--no-progress")
    assert code == 0 and "now holds 10" in out
    code, out, _ = cli(capsys, search, "collections", "list", "--json")
    listed = [json.loads(line) for line in out.splitlines()]
    assert [(c["name"], c["count"], c["model_name"]) for c in listed] == [
        ("cats", 0, "cats-v1"),
        ("clothes", 10, "fashion"),
        ("default", 0, ""),
    ]
    code, out, _ = cli(capsys, search, "collections", "list")
    assert code == 0 and "clothes" in out and "fashion" in out
    code, out, _ = cli(capsys, search, "aliases", "set", "wardrobe", "clothes")
    assert code == 0 and "'wardrobe' points at 'clothes'" in out
    code, out, _ = cli(capsys, search, "aliases", "list", "--json")
    assert [json.loads(line) for line in out.splitlines()] == [{"alias": "wardrobe", "collection": "clothes"}]
    query = next((base / "1").glob("*.png"))
    code, out, _ = cli(capsys, search, "search", "--collection", "wardrobe", str(query), "--json", "-k", "2")
    assert code == 0 and json.loads(out)["results"][0]["distance"] == pytest.approx(0, abs=1e-3)
    item_id = json.loads(out)["results"][0]["id"]
    code, out, _ = cli(
        capsys, search, "search", "--collection", "clothes", "--id", item_id, "--json", "-k", "1"
    )
    assert code == 0 and json.loads(out)["results"][0]["id"] != item_id
    code, out, _ = cli(capsys, search, "delete", "--collection", "wardrobe", item_id)
    assert code == 0 and "deleted 1" in out
    code, _, err = cli(capsys, search, "search", "--collection", "cats", str(query))
    assert code == 2 and "filled by the model 'cats-v1'" in err
    code, _, err = cli(capsys, search, "stats", "--collection", "nope")
    assert code == 2 and "NOT_FOUND" in err and "'nope'" in err
    code, _, err = cli(capsys, search, "collections", "drop", "clothes")
    assert code == 2 and "FAILED_PRECONDITION" in err and "'wardrobe'" in err
    assert cli(capsys, search, "aliases", "drop", "wardrobe")[0] == 0
    code, out, _ = cli(capsys, search, "collections", "drop", "clothes")
    assert code == 0 and "9 items" in out


def test_the_collection_comes_from_the_environment(
    search: ImageSearch, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    search.index.create_collection("clothes", "fashion")
    monkeypatch.setenv("IMGSEARCH_COLLECTION", "clothes")
    code, out, _ = cli(capsys, search, "stats", "--json")
    assert code == 0 and json.loads(out)["collection"] == "clothes"


def test_eval_show_and_migrate_take_a_collection(
    search: ImageSearch, tmp_path: Path, queries: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = write_digits(tmp_path / "base", 200)
    search.index.create_collection("clothes", "fashion")
    assert cli(capsys, search, "index", "--collection", "clothes", str(base), "--no-progress")[0] == 0
    code, out, err = cli(
        capsys, search, "eval", "--collection", "clothes", str(queries), "--json", "--no-progress"
    )
    assert code == 0 and json.loads(out)["queries"] == 150, err
    code, out, _ = cli(capsys, search, "eval", str(queries), "--json", "--no-progress")  # default is empty
    assert code == 0 and json.loads(out)["p_at_k"] == 0
    picture = tmp_path / "similar.png"
    query = next((queries / "4").glob("*.png"))
    code, out, _ = cli(capsys, search, "show", "--collection", "clothes", str(query), "-o", str(picture))
    assert code == 0 and picture.stat().st_size > 0
    other = start_index(tmp_path / "other")
    try:
        code, out, err = cli(
            capsys, search, "migrate", "--collection", "clothes", "--to", address(other), "--no-progress"
        )
        assert code == 0, err
        assert "created the collection 'clothes' (model 'fashion')" in err
        with closing(IndexClient(address(other))) as moved:
            stats = moved.stats(collection="clothes")
        assert (stats.count, stats.model_name) == (200, "fashion")
    finally:
        other.stop(0)


def test_collections_and_aliases_are_bounded(tmp_path: Path) -> None:
    service = start_index(tmp_path / "small", "--max-collections", "3")
    try:
        with closing(IndexClient(address(service))) as index:
            index.create_collection("one")
            index.create_collection("two")  # with default, three
            with pytest.raises(ServiceError, match=r"--max-collections 3") as refused:
                index.create_collection("three")
            assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            for alias in ("a", "b", "c"):
                index.set_alias(alias, "one")
            index.set_alias("c", "two")  # moving one is not a new one
            assert code_of(lambda: index.set_alias("d", "one")) == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert [c.name for c in index.list_collections()] == ["default", "one", "two"]
    finally:
        service.stop(0)

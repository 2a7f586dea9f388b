"""`imgsearch migrate` over real gRPC: index services in this process, on free ports."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import closing
from pathlib import Path

import grpc
import numpy as np
import pytest

from imgsearch.cli import main
from imgsearch.client import IndexClient, IndexStats, ScanPage, ServiceError
from imgsearch.filters import Condition
from imgsearch.migrate import MigrateRefused, MigrateReport, migrate
from index_service.service import IndexService
from tests.support import serve, start_index

COUNT, DIM, MODEL = 3000, 128, "model-a"


def address(service: IndexService) -> str:
    return f"127.0.0.1:{service.server.port}"


def items(count: int, dim: int = DIM, seed: int = 0) -> tuple[list[str], np.ndarray, list[dict[str, str]]]:
    vectors = np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)
    ids = [f"photos/{n % 10}/{n}.png" for n in range(count)]
    metadata = [{"label": str(n % 10), "source": f"/data/photos/{n}.png"} for n in range(count)]
    metadata[1] = {}  # no metadata at all
    metadata[2] = {**metadata[2], "note": "ünïcode, commas; and = signs", "empty": ""}
    return ids, vectors, metadata


def fill(client: IndexClient, count: int, model: str = MODEL, dim: int = DIM, batch: int = 1000) -> None:
    ids, vectors, metadata = items(count, dim)
    for start in range(0, count, batch):
        end = start + batch
        client.upsert(ids[start:end], vectors[start:end], metadata[start:end], model)


def everything(client: IndexClient) -> dict[str, tuple[dict[str, str], np.ndarray]]:
    """Every item of an index by id: (metadata, vector)."""
    found: dict[str, tuple[dict[str, str], np.ndarray]] = {}
    for page in client.scan(with_vectors=True):
        assert page.vectors is not None
        found.update((i, (m, v)) for i, m, v in zip(page.ids, page.metadata, page.vectors, strict=True))
    return found


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IndexService]:
    """COUNT items of MODEL (a few deleted again, so rows have moved), read by every test, written by none."""
    service = start_index(tmp_path_factory.mktemp("source"))
    with closing(IndexClient(address(service))) as client:
        fill(client, COUNT + 5)
        client.delete([f"photos/{n % 10}/{n}.png" for n in (3, 700, 1500, 2999, 3004)])
        assert client.stats().count == COUNT
    yield service
    service.stop(0)


@pytest.fixture
def target(tmp_path: Path) -> Iterator[IndexService]:
    yield from serve(start_index(tmp_path / "target"))


def imgsearch(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_migrate_copies_every_item_as_it_is(source: IndexService, target: IndexService) -> None:
    starts: list[int] = []
    pages: list[int] = []
    with closing(IndexClient(address(source))) as old, closing(IndexClient(address(target))) as new:
        report = migrate(old, new, page_size=700, on_start=starts.append, on_page=pages.append)
        assert (report.total, report.migrated, report.count, report.target_before) == (COUNT, COUNT, COUNT, 0)
        assert (report.model_version, report.dim, report.restarts, report.mismatch) == (MODEL, DIM, 0, "")
        assert starts == [COUNT] and pages == [700] * 4 + [200]
        assert report.summary() == (
            f"migrated {COUNT} items (model {MODEL}, dim {DIM}) from {address(source)} to "
            f"{address(target)} in {report.seconds:.1f} s"
        )

        stats = new.stats()
        assert (stats.count, stats.dim, stats.model_version) == (COUNT, DIM, MODEL)
        before, after = everything(old), everything(new)
        assert before.keys() == after.keys() and len(after) == COUNT
        for item_id, (metadata, vector) in before.items():
            assert after[item_id][0] == metadata
            assert np.array_equal(after[item_id][1], vector)
        assert after["photos/2/2.png"][0]["note"] == "ünïcode, commas; and = signs"

        queries = np.random.default_rng(7).standard_normal((25, DIM)).astype(np.float32)
        here, there = old.search(queries, k=10, model_version=MODEL), new.search(queries, k=10)
        assert [[m.id for m in row] for row in here] == [[m.id for m in row] for row in there]
        assert [[m.distance for m in row] for row in here] == [[m.distance for m in row] for row in there]
        assert [r[0].metadata for r in here] == [r[0].metadata for r in there]
        assert new.search_by_id(["photos/5/5.png"], 5) == old.search_by_id(["photos/5/5.png"], 5)

        # Run again (a migration that stopped, finished): each item stored once.
        with pytest.raises(MigrateRefused, match="already holds 3000 items"):
            migrate(old, new)
        again = migrate(old, new, into_nonempty=True)
        assert (again.migrated, again.count, again.target_before, again.mismatch) == (COUNT, COUNT, COUNT, "")
        assert new.stats().count == COUNT


def test_the_command_end_to_end(
    source: IndexService, target: IndexService, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ("--index", address(source), "migrate", "--to", address(target))
    code, out, err = imgsearch(capsys, *base)
    assert code == 0, err
    assert "migrating" in err and f"{COUNT}/{COUNT}" in err  # the progress bar
    [line] = out.strip().splitlines()
    prefix = (
        f"migrated {COUNT} items (model {MODEL}, dim {DIM}) from {address(source)} to {address(target)} in "
    )
    assert line.startswith(prefix) and line.endswith(" s")

    code, out, err = imgsearch(
        capsys, *base, "--into-nonempty", "--json", "--no-progress", "--page-size", "999"
    )
    assert code == 0 and not err
    summary = json.loads(out)
    assert summary["migrated"] == summary["total"] == summary["count"] == summary["target_before"] == COUNT
    assert (summary["model_version"], summary["dim"], summary["verified"]) == (MODEL, DIM, True)
    assert summary["items_per_s"] > 0
    with closing(IndexClient(address(target))) as new:
        assert new.stats().count == COUNT


def test_refuses_the_source_itself(source: IndexService, capsys: pytest.CaptureFixture[str]) -> None:
    for same in (
        address(source),
        f"localhost:{source.server.port}",
        f"dns:///localhost:{source.server.port}",
    ):
        code, out, err = imgsearch(capsys, "--index", address(source), "migrate", "--to", same)
        assert code == 2 and not out
        assert "is the collection being migrated" in err and "another index service" in err
        assert len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit, match="--to needs the address"):  # not taken for IMGSEARCH_INDEX
        main(["--index", address(source), "migrate", "--to", " "])


def test_refuses_a_nonempty_target_unless_asked(
    source: IndexService, target: IndexService, capsys: pytest.CaptureFixture[str]
) -> None:
    with closing(IndexClient(address(target))) as client:
        client.upsert(["mine"], np.ones((1, DIM), np.float32), [{"label": "x"}], MODEL)
    base = ("--index", address(source), "migrate", "--to", address(target), "--no-progress")
    code, out, err = imgsearch(capsys, *base)
    assert code == 2 and not out and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "already holds 1 item " in err and "--into-nonempty" in err
    with closing(IndexClient(address(target))) as client:
        assert client.stats().count == 1  # nothing was written

    code, out, err = imgsearch(capsys, *base, "--into-nonempty")
    assert code == 0 and out.startswith(f"migrated {COUNT} items"), err
    with closing(IndexClient(address(target))) as client:
        assert client.stats().count == COUNT + 1
        assert client.get(["mine"])[0][0].metadata == {"label": "x"}


@pytest.mark.parametrize("model,dim", [("another-model", DIM), (MODEL, 64)])
def test_refuses_a_target_of_another_model_version_or_dim(
    source: IndexService, target: IndexService, capsys: pytest.CaptureFixture[str], model: str, dim: int
) -> None:
    with closing(IndexClient(address(target))) as client:
        client.upsert(["kept"], np.ones((1, dim), np.float32), [{"label": "1"}], model)
    for extra in ((), ("--into-nonempty",)):
        code, out, err = imgsearch(
            capsys, "--index", address(source), "migrate", "--to", address(target), "--no-progress", *extra
        )
        assert code == 2 and not out and "Traceback" not in err and len(err.strip().splitlines()) == 1
        assert f"holds 1 vector of model version {model!r}, dim {dim}" in err
        assert f"the source's are model version {MODEL!r}, dim {DIM}" in err
    with closing(IndexClient(address(target))) as client:
        stats = client.stats()
        assert (stats.count, stats.model_version, stats.dim) == (1, model, dim)


def test_an_empty_source_migrates_nothing(
    target: IndexService, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = start_index(tmp_path / "empty")
    try:
        with closing(IndexClient(address(target))) as client:
            client.upsert(["mine"], np.ones((1, 8), np.float32), [], "other")  # untouched, even so
        base = ("--index", address(empty), "migrate", "--to", address(target))
        code, out, _ = imgsearch(capsys, *base)
        assert code == 0
        assert (
            out.strip()
            == f"nothing to migrate: the index at {address(empty)} is empty; {address(target)} is unchanged"
        )
        code, out, _ = imgsearch(capsys, *base, "--json")
        assert code == 0 and json.loads(out)["migrated"] == 0 and json.loads(out)["verified"] is True
        with closing(IndexClient(address(target))) as client:
            assert client.stats().count == 1
    finally:
        empty.stop(0)


def test_pages_fit_both_services_max_batch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A page size over the source's --max-batch falls back to its default; the upserts are halved until
    they fit the target's."""
    small_source = start_index(tmp_path / "source", "--max-batch", "500")
    small_target = start_index(tmp_path / "target", "--max-batch", "300")
    try:
        with closing(IndexClient(address(small_source))) as client:
            fill(client, 1200, batch=500)
        code, out, err = imgsearch(
            capsys,
            "--index",
            address(small_source),
            "migrate",
            "--to",
            address(small_target),
            "--no-progress",
        )
        assert code == 0 and out.startswith("migrated 1200 items"), err
        assert "over the limit of 500 items per page" in err and "default page size" in err
        with closing(IndexClient(address(small_target))) as client:
            assert client.stats().count == 1200
    finally:
        small_source.stop(0)
        small_target.stop(0)


class FlakySource(IndexClient):
    """A source whose first scan breaks off after two pages, as when the service restarts."""

    scans = 0

    def scan(
        self,
        page_size: int = 0,
        with_vectors: bool = False,
        *,
        collection: str | None = None,
        filter: Sequence[Condition] = (),
    ) -> Iterator[ScanPage]:
        self.scans += 1
        pages = super().scan(page_size, with_vectors, collection=collection, filter=filter)
        if self.scans > 1:
            return pages
        return self._broken(pages)

    def _broken(self, pages: Iterator[ScanPage]) -> Iterator[ScanPage]:
        for number, page in enumerate(pages):
            if number == 2:
                raise ServiceError("index", self.address, grpc.StatusCode.UNAVAILABLE, "connection reset")
            yield page


class FlakyTarget(IndexClient):
    """A target that is unreachable for the second upsert's first try."""

    upserts = 0

    def upsert(self, *args, **kwargs) -> int:  # type: ignore[no-untyped-def]
        self.upserts += 1
        if self.upserts == 2:
            raise ServiceError("index", self.address, grpc.StatusCode.UNAVAILABLE, "restarting")
        return super().upsert(*args, **kwargs)


def test_outages_are_waited_out(source: IndexService, target: IndexService) -> None:
    notes: list[str] = []
    with closing(FlakySource(address(source))) as old, closing(FlakyTarget(address(target))) as new:
        report = migrate(old, new, page_size=1000, patience_s=10, on_wait=notes.append)
        assert (report.migrated, report.count, report.restarts, report.mismatch) == (COUNT, COUNT, 1, "")
        assert old.scans == 2
        assert new.upserts == 4  # 3 pages, one sent twice; the pages already copied were not sent again
        assert everything(new).keys() == everything(old).keys()
    assert any("(restarting); retrying" in note for note in notes)
    assert any(
        "(connection reset); the scan is begun again (2000 items copied so far)" in note for note in notes
    )


def test_a_target_that_lost_items_is_reported() -> None:
    report = MigrateReport("a:1", "b:2", 10, 10, "m", 4, target_before=0, count=9, seconds=1.0)
    assert (
        "holds 9 items, but 10 items were copied (the source's count when the scan began)" in report.mismatch
    )
    assert not MigrateReport("a:1", "b:2", 10, 10, "m", 4, target_before=3, count=9, seconds=1.0).mismatch
    assert report.as_dict()["verified"] is False


class BlindTarget(IndexClient):
    """A target whose stats say it is empty: as if another model's vectors were written to it after the
    check."""

    def stats(self, *, collection: str | None = None) -> IndexStats:
        return IndexStats(0, 0, "", 0, "default")


def test_a_target_that_refuses_the_vectors_part_way_gets_one_clear_line(
    source: IndexService, target: IndexService
) -> None:
    with closing(IndexClient(address(target))) as client:
        client.upsert(["theirs"], np.ones((1, DIM), np.float32), [], "another-model")
    old, new = IndexClient(address(source)), BlindTarget(address(target))
    with closing(old), closing(new), pytest.raises(MigrateRefused) as refused:
        migrate(old, new)
    text = str(refused.value)
    assert text.startswith(
        f"the target index at {address(target)} refused vectors of model version {MODEL!r}"
    )
    assert "'another-model'" in text and "after 0 items were copied" in text and "reindex" not in text

"""`imgsearch reindex` over real services: the encoder and three index services in this process."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import grpc
import numpy as np
import pytest

from encoder_service.service import EncoderService
from imgsearch.addresses import same_service
from imgsearch.cli import main
from imgsearch.client import EncoderClient, ImageSearch, IndexClient, ServiceError
from imgsearch.ingest import collect_images
from index_service.service import IndexService
from tests.support import serve, start_encoder, start_index, write_digits

OLD = "old-model"
COUNT = 40


@pytest.fixture(scope="module")
def encoder() -> Iterator[EncoderService]:
    yield from serve(start_encoder())


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = write_digits(tmp_path / "digits", COUNT, digits=3)
    (root / "broken.png").write_bytes(b"not an image")
    return root


@pytest.fixture
def source(tmp_path: Path, folder: Path) -> Iterator[IndexService]:
    """An index of the folder as an older model left it: the ingest's ids and metadata, other vectors,
    and three items that cannot be embedded again (no source, a file gone, a file not an image)."""
    service = start_index(tmp_path / "source")
    files, _ = collect_images([folder])
    images = [f for f in files if f.path.name != "broken.png"]
    broken = next(f for f in files if f.path.name == "broken.png")
    ids = [f.id for f in images] + ["no-source", "gone.png", broken.id]
    metadata = [f.metadata for f in images] + [
        {"label": "x"},
        {"label": "y", "source": str(folder / "gone.png")},
        broken.metadata,
    ]
    metadata[0] = {**metadata[0], "note": "kept as it was"}
    vectors = np.random.default_rng(0).standard_normal((len(ids), 128)).astype(np.float32)
    with closing(IndexClient(address(service))) as client:
        client.upsert(ids, vectors, metadata, OLD)
    yield service
    service.stop(0)


def address(service: IndexService) -> str:
    return f"127.0.0.1:{service.server.port}"


def everything(client: IndexClient) -> dict[str, tuple[dict[str, str], np.ndarray]]:
    """Every item of an index by id: (metadata, vector)."""
    items: dict[str, tuple[dict[str, str], np.ndarray]] = {}
    for page in client.scan(with_vectors=True):
        assert page.vectors is not None
        items.update((i, (m, v)) for i, m, v in zip(page.ids, page.metadata, page.vectors, strict=True))
    return items


def imgsearch(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_reindex_embeds_every_item_again_into_a_fresh_index(
    encoder: EncoderService,
    source: IndexService,
    folder: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    encoder_address = f"127.0.0.1:{encoder.server.port}"
    with closing(EncoderClient(encoder_address)) as info:
        version = info.info()["model_version"]
    png = next((folder / "3").glob("*.png"))

    # The old index refuses the new model's vectors, and says how to change models.
    with ImageSearch(encoder_address, address(source)) as search, pytest.raises(ServiceError) as refused:
        search.search([png.read_bytes()])
    assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
    for words in (
        "create a collection for the new model",
        "`imgsearch reindex --collection OLD --to-collection NEW`",
        "`source` path",
        "point an alias at it",
    ):
        assert words in str(refused.value)
    code, _, err = imgsearch(
        capsys, "--encoder", encoder_address, "--index", address(source), "index", str(png)
    )
    assert (
        code == 2
        and "FAILED_PRECONDITION" in err
        and "`imgsearch reindex --collection OLD --to-collection NEW`" in err
    )

    target = start_index(tmp_path / "target")
    try:
        to = address(target)
        args = ("--encoder", encoder_address, "--index", address(source), "reindex", "--to", to)
        code, out, err = imgsearch(capsys, *args, "--batch-size", "7")
        assert code == 1, err  # some items were skipped
        assert "reindexing" in err and "43/43" in err  # the progress bar
        lines = out.strip().splitlines()
        assert (
            lines[-1] == f"reindexed {COUNT} of {COUNT + 3} items into {to}, collection 'default' "
            f"(model version {version}); skipped 3"
        )
        assert "  no-source: no `source` path in its metadata" in lines
        assert any(line.startswith("  gone.png: cannot read") and "gone.png)" in line for line in lines)
        assert any(line.startswith("  broken.png: ") and "cannot decode" in line for line in lines)

        with closing(IndexClient(address(source))) as old, closing(IndexClient(to)) as new:
            before, after = everything(old), everything(new)
            stats = new.stats()
        assert (stats.count, stats.dim, stats.model_version) == (COUNT, 128, version)
        # the metadata kept as it was, and each item's novelty by the new model added (imgsearch.ingest)
        assert {i: {k: v for k, v in m.items() if k != "novelty"} for i, (m, _) in after.items()} == {
            i: m for i, (m, _) in before.items() if i not in ("no-source", "gone.png", "broken.png")
        }
        assert all(float(m["novelty"]) >= 0 for m, _ in after.values())
        assert any(m.get("note") == "kept as it was" for m, _ in after.values())
        files = sorted(after)
        with closing(EncoderClient(encoder_address)) as direct:
            fresh = direct.embed([Path(after[i][0]["source"]).read_bytes() for i in files]).vectors
        np.testing.assert_allclose(np.stack([after[i][1] for i in files]), fresh, rtol=1e-5, atol=1e-5)
        with ImageSearch(encoder_address, to) as search:
            top = search.search([png.read_bytes()], k=1)[0][0]
        assert top.id == f"3/{png.name}" and top.distance < 1e-4

        # Run again (a reindex that stopped half way): the same items, stored once.
        code, out, _ = imgsearch(capsys, *args, "--no-progress")
        assert code == 1 and out.strip().splitlines()[-1].startswith(
            f"reindexed {COUNT} of {COUNT + 3} items"
        )
        with closing(IndexClient(to)) as new:
            assert new.stats().count == COUNT
    finally:
        target.stop(0)


def test_reindex_refuses_the_source_itself_and_another_models_index(
    encoder: EncoderService, source: IndexService, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ("--encoder", f"127.0.0.1:{encoder.server.port}", "--index", address(source), "reindex")
    for same in (address(source), f"localhost:{source.server.port}"):
        code, out, err = imgsearch(capsys, *base, "--to", same, "--no-progress")
        assert code == 2 and not out
        assert "is the collection being reindexed" in err and "--to-collection a new collection" in err

    other = start_index(tmp_path / "other")
    try:
        with closing(IndexClient(address(other))) as client:
            client.upsert(["kept"], np.ones((1, 128), np.float32), [{"label": "1"}], "another-model")
        code, out, err = imgsearch(capsys, *base, "--to", address(other), "--no-progress")
        assert code == 2 and not out and "Traceback" not in err
        assert "holds 1 vector of model version 'another-model'" in err and "a new, empty collection" in err
        with closing(IndexClient(address(other))) as client:
            assert client.stats().count == 1  # nothing was written
    finally:
        other.stop(0)
    with closing(IndexClient(address(source))) as client:
        assert client.stats().count == COUNT + 3 and client.stats().model_version == OLD


def test_an_empty_source_reindexes_nothing(
    encoder: EncoderService, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty, target = start_index(tmp_path / "empty"), start_index(tmp_path / "target")
    try:
        code, out, _ = imgsearch(
            capsys,
            *("--encoder", f"127.0.0.1:{encoder.server.port}", "--index", address(empty)),
            *("reindex", "--to", address(target), "--no-progress"),
        )
        assert code == 0 and out.strip().startswith(f"reindexed 0 of 0 items into {address(target)}")
    finally:
        empty.stop(0)
        target.stop(0)


@pytest.mark.parametrize(
    "first,second,same",
    [
        ("127.0.0.1:5000", "127.0.0.1:5000", True),
        ("127.0.0.1:5000", "localhost:5000", True),
        ("dns:///localhost:5000", "[::1]:5000", True),
        ("ipv4:127.0.0.1:5000,127.0.0.1:5001", "127.0.0.1:5001", True),
        ("127.0.0.1:5000", "127.0.0.1:5001", False),
        ("no-such-host.invalid:5000", "other-host.invalid:5000", False),
    ],
)
def test_same_service(first: str, second: str, same: bool) -> None:
    assert same_service(first, second) is same

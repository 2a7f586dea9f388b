"""`index_images`' pipeline: however many batches are in flight, the same images are stored and the same
files are reported skipped, in the same order, as one batch after the other gives."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from encoder_service.service import EncoderService
from imgsearch.client import ImageSearch
from imgsearch.ingest import IngestReport, collect_images, index_images
from tests.support import mnist_sample, serve, start_encoder, start_index


@pytest.fixture(scope="module")
def encoder() -> Iterator[EncoderService]:
    yield from serve(start_encoder())


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 digits with 4 broken files spread over the batches (of 7) and one file deleted after listing."""
    root = tmp_path_factory.mktemp("ingest")
    x, y = mnist_sample(60)
    for n, (digit, label) in enumerate(zip(x, y, strict=True)):
        path = root / str(label) / f"{n:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        if n in (3, 17, 18, 45):
            path.write_bytes(b"not an image")
        else:
            Image.fromarray(digit).save(path)
    return root


def ingest(encoder: EncoderService, folder: Path, data_dir: Path, in_flight: int) -> tuple[IngestReport, int]:
    files, skipped = collect_images([folder])
    gone = files[30].path
    saved = gone.read_bytes()
    gone.unlink()  # listed, then unreadable
    index = start_index(data_dir)
    batches: list[int] = []
    try:
        with ImageSearch(f"127.0.0.1:{encoder.server.port}", f"127.0.0.1:{index.server.port}") as search:
            report = index_images(search, files, batch_size=7, on_batch=batches.append, in_flight=in_flight)
            count = search.index.stats().count
    finally:
        index.stop(0)
        gone.write_bytes(saved)
    assert not skipped and batches == [7] * 8 + [4]  # progress: every batch once, in order
    return report, count


def test_every_pipeline_depth_reports_as_one_batch_after_the_other(
    encoder: EncoderService, folder: Path, tmp_path: Path
) -> None:
    reports = {depth: ingest(encoder, folder, tmp_path / str(depth), depth) for depth in (0, 1, 2, 3)}
    serial, count = reports[0]
    assert serial.indexed == count == serial.count == 55
    files, _ = collect_images([folder])
    broken = {f"{n:03d}.png" for n in (3, 17, 18, 45)}
    expected = []  # batch by batch: the unreadable file, then the files the encoder refused
    for start in range(0, len(files), 7):
        batch = files[start : start + 7]
        expected += [f.path.name for f in batch if f is files[30]]
        expected += [f.path.name for f in batch if f.path.name in broken]
    assert [Path(path).name for path, _ in serial.skipped] == expected
    reasons = dict((Path(path).name, reason) for path, reason in serial.skipped)
    assert "cannot read" in reasons[files[30].path.name] and "cannot decode" in reasons["003.png"]
    for depth, (report, stored) in reports.items():
        assert (report.indexed, report.count, stored) == (55, 55, 55), depth
        assert report.skipped == serial.skipped, depth

"""The benchmark's pure helpers, on a few images: a broken bench import or helper fails here, in a second or
two. No timing is asserted: measured speed never goes in a test."""

from __future__ import annotations

import io
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from bench import e2e, encoder, hostile, report
from bench.images import label_folder, png_bytes, write_png_folder
from bench.report import Figure, Section
from encoder_service.model_dir import DEFAULT_MODEL_DIR
from encoder_service.runtime import LiteRTRuntime
from tests.support import mnist_sample
from tools.local import ServiceProcess, free_port, wait_healthy


def test_png_bytes_reads_back_pixel_for_pixel() -> None:
    x, _ = mnist_sample(5)
    for pixels in x:
        with Image.open(io.BytesIO(png_bytes(pixels))) as image:
            assert (image.format, image.mode, image.size) == ("PNG", "L", (28, 28))
            np.testing.assert_array_equal(np.asarray(image), pixels)


def test_write_png_folder_makes_one_folder_per_label(tmp_path: Path) -> None:
    x, y = mnist_sample(6)
    names = tuple(f"class {n}/x" for n in range(10))
    written = write_png_folder(tmp_path, x, y, names)
    files = sorted(tmp_path.rglob("*.png"))
    assert len(files) == 6 and written == sum(f.stat().st_size for f in files)
    assert {f.parent.name for f in files} == {label_folder(names[int(label)]) for label in y}
    assert all("/" not in f.parent.name and " " not in f.parent.name for f in files)


def test_one_tiny_encoder_measurement() -> None:
    x, _ = mnist_sample(4)
    images = encoder.Images([png_bytes(pixels) for pixels in x])
    assert images.pixels.shape == (4, 28, 28) and images.pixels.dtype == np.float32
    assert images.take(3) == slice(0, 3) and images.take(3) == slice(0, 3)  # wraps around
    litert = LiteRTRuntime(DEFAULT_MODEL_DIR)
    system = encoder.System(
        "decode + LiteRT", "", lambda part: litert.embed(encoder.decode_batch(images.pngs[part]))
    )
    times = encoder.call_times_s(system, images, batch=2, calls=3, warmup=1)
    assert times.shape == (3,) and (times > 0).all()
    np.testing.assert_array_equal(encoder.decode_batch(images.pngs), images.pixels)
    rates = {(system.name, b): 1000.0 for b in encoder.BATCHES}
    table = encoder._main_table([system], {"echo": (0.5, 0.9), system.name: (0.2, 0.4)}, rates)
    assert "| decode + LiteRT |" in table and "1,000" in table


def test_the_tables_and_the_plot(tmp_path: Path) -> None:
    sweep = {
        "in-process LiteRT, model only": {1: 10.0, 8: 80.0},
        "in-process decode + LiteRT": {1: 5.0, 8: 40.0},
        "encoder service (litert)": {1: 1.0, 8: 20.0},
    }
    assert "| 8 | 80 | 40 | 20 | 0.50 |" in encoder._sweep_table(sweep)
    plot = encoder._plot(sweep, tmp_path / "plot.png")
    assert plot.read_bytes().startswith(b"\x89PNG")
    assert "| 2 (the default) |" in e2e._depth_table([(0, 100.0), (2, 150.0)])


def test_write_report_has_the_figure_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(report, "machine_description", lambda: "- machine: here")  # no TensorFlow import
    figure = Figure(
        "encoder service, one image, p50",
        1.1,
        "ms",
        reference="echo + decode + LiteRT",
        reference_value=1.0,
        ratio=1.1,
        target="ratio <= 1.3",
        met=True,
    )
    section = Section("Smoke", figures=[figure], tables=[("a table", "| a |\n| --- |\n| 1 |")])
    text = report.write_report([section], tmp_path / "REPORT.md", "pytest", 1.0).read_text()
    assert "- machine: here" in text and "## Smoke" in text and "**a table**" in text
    row = "| encoder service, one image, p50 | 1.1 ms | echo + decode + LiteRT (1 ms) | 1.1 | ratio <= 1.3 |"
    assert row + " yes |" in text


@pytest.mark.parametrize("model", hostile.MODELS)
def test_each_server_model_serves_echo_busy_and_health(model: str) -> None:
    port = free_port()
    server = ServiceProcess("bench.model_server", port, [model]).start()
    try:
        wait_healthy(server.address, 60, server.process)  # type: ignore[arg-type]
        with grpc.insecure_channel(server.address) as channel:
            echo = channel.unary_unary(
                "/bench.Work/Echo", request_serializer=None, response_deserializer=None
            )
            busy = channel.unary_unary(
                "/bench.Work/Busy", request_serializer=None, response_deserializer=None
            )
            assert echo(b"abc", timeout=10) == b"abc"
            assert busy(b"", timeout=10) == b""
            with hostile.watches_open(channel, 2) as served:
                assert served == [True, True]
    finally:
        assert server.stop() == 0

"""Hostile callers against a real encoder process (issue 12): pixel bombs, over-size headers, images past
the decoding budget, empty batches. Each encoder here is a child process on a free port (LiteRT, the
shipped default model), so its memory can be read from /proc/PID/status: VmHWM is the process's peak
resident size, VmRSS its size now. The last tests check the pieces of the fix in process.

A pixel bomb is a PNG of 6300 x 6300 zero pixels: 38 KB on the wire, 39.7 M pixels decoded, inside the
default --max-image-pixels (40 M)."""

from __future__ import annotations

import struct
import threading
import time
import zlib
from collections.abc import Iterator
from functools import cache

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from encoder_service import preprocess, servicer
from encoder_service.model_dir import shipped_model
from encoder_service.runtime import load_runtime
from imgsearch import wire
from imgsearch.v1 import encoder_pb2, encoder_pb2_grpc
from imgsearch_server.errors import RequestError
from tests.support import encode, glyph
from tools.local import ServiceProcess, free_port

MIB = 1024 * 1024
# The bound the issue sets: the encoder's peak resident size with the default flags, under any burst.
PEAK_BOUND_BYTES = 1024 * MIB
# After a burst, resident size must come back to within this of its resting size (taken after one
# warm-up call, about 75 MiB). Measured on the 2-core test machine, the bursts below leave 14-25 MiB
# more (gRPC's and the interpreters' pools, heap the allocator keeps between live blocks); without the
# encoder's malloc_trim after large calls they left 52 MiB (8 zero bombs) to 690 MiB (16 RGBA ones), and
# before the fix 880 MiB (8 zero bombs). 64 MiB is over twice the noise and far under any of those.
RESTING_TOLERANCE_BYTES = 64 * MIB
BUDGET_FLAG = "--decode-budget-mib"
CALL_TIMEOUT_S = 60.0


def png_header_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_bomb(width: int, height: int, *, rgba: bool = False, inked: bool = False) -> bytes:
    """A PNG written by hand, so a huge one costs nothing to make: 8-bit gray (or RGBA), every row the
    same and zlib squeezing it about 1000 times. Rows of zeros (the attacker's file) give an image with no
    ink, the decoder's cheapest path; `inked` puts a light pixel every 64 columns on a dark row, so the
    ink spans the whole image and all of it is fitted (each row after the first is filter 2, "up": zeros)."""
    channels = 4 if rgba else 1
    header = png_header_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 6 if rgba else 0, 0, 0, 0))
    row = bytearray(width * channels)
    if inked:
        row[:: 64 * channels] = b"\xff" * len(range(0, width * channels, 64 * channels))
        if rgba:
            row[3::channels] = b"\xff" * width  # opaque
    packer = zlib.compressobj(9)
    data = packer.compress(b"\x00" + bytes(row))
    data += packer.compress(((b"\x02" if inked else b"\x00") + bytes(len(row))) * (height - 1))
    data += packer.flush()
    return b"\x89PNG\r\n\x1a\n" + header + png_header_chunk(b"IDAT", data) + png_header_chunk(b"IEND", b"")


def png_header_only(width: int, height: int) -> bytes:
    """An 8-bit gray PNG header with a token IDAT: Pillow reads its size; decoding it would fail."""
    header = png_header_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    idat = png_header_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
    return b"\x89PNG\r\n\x1a\n" + header + idat + png_header_chunk(b"IEND", b"")


@cache
def pixel_bomb(kind: str = "zeros") -> bytes:
    """6300 x 6300 = 39.7 M pixels, inside the default --max-image-pixels: the attacker's 38 KB PNG of zero
    pixels, or the same size with ink across it as gray or RGBA (the costliest PNG to decode)."""
    return png_bomb(6300, 6300, rgba=kind == "inked-rgba", inked=kind != "zeros")


GOOD = encoder_pb2.Image(encoded=encode(glyph(), "PNG"))


def status_field(pid: int, field: str) -> int:
    """A /proc/PID/status size (VmRSS, VmHWM) in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise LookupError(field)


class Encoder:
    """An encoder child process and a channel to it."""

    def __init__(self, *args: str) -> None:
        self.service = ServiceProcess("encoder_service", free_port(), ["--host", "127.0.0.1", *args])
        self.service.start()
        try:
            self.service.wait_healthy(timeout_s=60)
        except BaseException:
            self.service.kill()
            raise
        self.address = f"127.0.0.1:{self.service.port}"
        self.channel = grpc.insecure_channel(self.address)
        self.stub = encoder_pb2_grpc.EncoderStub(self.channel)

    @property
    def pid(self) -> int:
        assert self.service.process is not None
        return self.service.process.pid

    def embed(self, *images: encoder_pb2.Image) -> encoder_pb2.EmbedResponse:
        return self.stub.Embed(encoder_pb2.EmbedRequest(images=list(images)), timeout=CALL_TIMEOUT_S)

    def refusal(self, *images: encoder_pb2.Image, reconstruct: bool = False) -> grpc.RpcError:
        """The error a call that must fail gets."""
        with pytest.raises(grpc.RpcError) as caught:
            if reconstruct:
                request = encoder_pb2.ReconstructRequest(images=list(images))
                self.stub.Reconstruct(request, timeout=CALL_TIMEOUT_S)
            else:
                self.embed(*images)
        return caught.value

    def assert_healthy(self) -> None:
        """The health service answers SERVING and a normal call still gets its vector."""
        check = health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        assert wire.unpack(self.embed(GOOD).vectors).shape == (1, 128)

    def close(self) -> None:
        self.channel.close()
        self.service.stop(10)


@pytest.fixture
def default_encoder() -> Iterator[Encoder]:
    """A fresh encoder with the default flags, so its VmHWM is its own peak for this test only."""
    encoder = Encoder()
    yield encoder
    encoder.close()


@pytest.fixture(scope="module")
def small_limit_encoder() -> Iterator[Encoder]:
    encoder = Encoder("--max-image-pixels", "1000000")
    yield encoder
    encoder.close()


@pytest.fixture(scope="module")
def large_limit_encoder() -> Iterator[Encoder]:
    """A per-image limit over Pillow's own (about 89.5 M pixels), a 320 MiB budget, and no waiting for it."""
    encoder = Encoder("--max-image-pixels", "200000000", BUDGET_FLAG, "320", "--decode-wait-s", "0")
    yield encoder
    encoder.close()


def burst(encoder: Encoder, calls: int, images: list[encoder_pb2.Image]) -> list[object]:
    """`calls` concurrent Embed calls of `images`, each on its own channel, released together; returns
    each call's EmbedResponse or grpc.RpcError."""
    start = threading.Barrier(calls)
    outcomes: list[object] = [None] * calls

    def call(n: int) -> None:
        with grpc.insecure_channel(encoder.address) as channel:
            stub = encoder_pb2_grpc.EncoderStub(channel)
            grpc.channel_ready_future(channel).result(timeout=10)
            start.wait()
            try:
                outcomes[n] = stub.Embed(encoder_pb2.EmbedRequest(images=images), timeout=CALL_TIMEOUT_S)
            except grpc.RpcError as error:
                outcomes[n] = error

    threads = [threading.Thread(target=call, args=(n,)) for n in range(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(CALL_TIMEOUT_S + 10)
    return outcomes


def assert_vectors_or_budget_refusal(outcomes: list[object], images: int) -> tuple[int, int]:
    """Each outcome is `images` vectors or RESOURCE_EXHAUSTED naming the budget flag; returns the counts."""
    served = refused = 0
    for outcome in outcomes:
        if isinstance(outcome, encoder_pb2.EmbedResponse):
            assert wire.unpack(outcome.vectors).shape == (images, 128)
            served += 1
        else:
            assert isinstance(outcome, grpc.RpcError), outcome
            assert outcome.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (outcome.code(), outcome.details())
            assert BUDGET_FLAG in (outcome.details() or "")
            refused += 1
    return served, refused


@pytest.mark.parametrize(
    "kind,calls", [("zeros", 8), ("zeros", 16), ("inked-gray", 8), ("inked-rgba", 8), ("inked-rgba", 16)]
)
def test_concurrent_pixel_bombs_stay_under_the_memory_bound(
    default_encoder: Encoder, kind: str, calls: int
) -> None:
    """Concurrent calls of one 6300 x 6300 bomb each: every caller gets its vector or RESOURCE_EXHAUSTED
    naming the budget; the encoder's peak stays under the bound, it stays healthy, and its resident size
    comes back near where it rested."""
    assert len(pixel_bomb(kind)) < 200_000  # 38 KB of zeros, 52 KB inked gray, 170 KB inked RGBA
    bomb = encoder_pb2.Image(encoded=pixel_bomb(kind))
    default_encoder.assert_healthy()  # one warm-up call: the resting size includes a used interpreter
    resting = status_field(default_encoder.pid, "VmRSS")

    outcomes = burst(default_encoder, calls, [bomb])

    peak = status_field(default_encoder.pid, "VmHWM")
    served, refused = assert_vectors_or_budget_refusal(outcomes, 1)
    print(
        f"\n{calls} {kind} bombs: resting {resting / MIB:.0f} MiB, peak {peak / MIB:.0f} MiB, {served} served"
    )
    assert served >= 1, "the budget must let at least one bomb through"
    assert peak < PEAK_BOUND_BYTES, (
        f"peak {peak / MIB:.0f} MiB over the bound ({served} served, {refused} refused)"
    )
    default_encoder.assert_healthy()
    time.sleep(0.2)  # the last call's reply leaves the server after its handler returns
    after = status_field(default_encoder.pid, "VmRSS")
    print(f"after the burst: {after / MIB:.0f} MiB ({(after - resting) / MIB:+.0f} MiB)")
    assert after - resting < RESTING_TOLERANCE_BYTES, f"{(after - resting) / MIB:.0f} MiB still held"


def test_an_image_over_the_limit_gets_the_limits_own_message(small_limit_encoder: Encoder) -> None:
    big = encoder_pb2.Image(encoded=encode(Image.new("L", (2000, 2000), 0), "PNG"))
    error = small_limit_encoder.refusal(GOOD, big, GOOD)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == (
        "image 1: 2000 x 2000 = 4000000 pixels, over the limit of 1000000 pixels per image "
        "(--max-image-pixels)"
    )
    assert ("imgsearch-bad-image", "1") in tuple(error.trailing_metadata() or ())  # type: ignore[attr-defined]
    small_limit_encoder.assert_healthy()


@pytest.mark.parametrize("side", [10_000, 20_000])  # over Pillow's warning (89.5 M) and error (179 M) limits
def test_a_header_over_pillows_own_limit_gets_our_limits_message(
    small_limit_encoder: Encoder, side: int
) -> None:
    huge = encoder_pb2.Image(encoded=png_header_only(side, side))
    error = small_limit_encoder.refusal(GOOD, GOOD, huge)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == (
        f"image 2: {side} x {side} = {side * side} pixels, over the limit of 1000000 pixels per image "
        "(--max-image-pixels)"
    )
    assert ("imgsearch-bad-image", "2") in tuple(error.trailing_metadata() or ())  # type: ignore[attr-defined]


def test_a_header_over_a_large_limit_gets_its_message(large_limit_encoder: Encoder) -> None:
    """At --max-image-pixels 200 M, 400 M pixels is over twice Pillow's own limit: ours still speaks."""
    huge = encoder_pb2.Image(encoded=png_header_only(20_000, 20_000))
    error = large_limit_encoder.refusal(GOOD, huge)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == (
        "image 1: 20000 x 20000 = 400000000 pixels, over the limit of 200000000 pixels per image "
        "(--max-image-pixels)"
    )


def test_an_image_over_pillows_limit_within_ours_is_decoded(large_limit_encoder: Encoder) -> None:
    """9500 x 9500 = 90.25 M pixels: over Pillow's default limit, within --max-image-pixels 200 M and the
    budget; the operator's flag decides, not Pillow's."""
    reply = large_limit_encoder.embed(encoder_pb2.Image(encoded=png_bomb(9500, 9500)), GOOD)
    assert wire.unpack(reply.vectors).shape == (2, 128)


@pytest.mark.parametrize("reconstruct", [False, True])
def test_an_empty_batch_is_refused(small_limit_encoder: Encoder, reconstruct: bool) -> None:
    error = small_limit_encoder.refusal(reconstruct=reconstruct)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "the batch is empty: send at least one image"


@pytest.mark.parametrize("reconstruct", [False, True])
def test_an_image_larger_than_the_whole_budget_is_refused_at_once(
    large_limit_encoder: Encoder, reconstruct: bool
) -> None:
    """14000 x 14000 = 196 M pixels is within the 200 M limit, but its 8-bit gray copy alone is 187 MiB
    and its decoding more than the whole 320 MiB budget: it can never run, so it is refused at once."""
    huge = encoder_pb2.Image(encoded=png_header_only(14_000, 14_000))
    started = time.monotonic()
    error = large_limit_encoder.refusal(GOOD, huge, reconstruct=reconstruct)
    assert time.monotonic() - started < 2
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (error.code(), error.details())
    details = error.details() or ""
    assert details.startswith("image 1: 14000 x 14000") and "never" in details and BUDGET_FLAG in details
    assert "decompression bomb" not in details
    large_limit_encoder.assert_healthy()


def test_calls_past_a_full_budget_are_refused_naming_the_flag(large_limit_encoder: Encoder) -> None:
    """Bombs whose decoding fits the 320 MiB budget a few at a time, sixteen at once with no wait for the
    budget: some are served, the others refused with RESOURCE_EXHAUSTED, and the encoder stays healthy."""
    bomb = encoder_pb2.Image(encoded=pixel_bomb())
    served, refused = assert_vectors_or_budget_refusal(burst(large_limit_encoder, 16, [bomb]), 1)
    assert served >= 1 and refused >= 1, (served, refused)
    large_limit_encoder.assert_healthy()


def test_reconstruct_is_held_to_the_same_limit(small_limit_encoder: Encoder) -> None:
    big = encoder_pb2.Image(encoded=png_bomb(2000, 2000))
    error = small_limit_encoder.refusal(GOOD, big, reconstruct=True)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == (
        "image 1: 2000 x 2000 = 4000000 pixels, over the limit of 1000000 pixels per image "
        "(--max-image-pixels)"
    )


# ---------------------------------------------------------------- in process: the pieces of the fix


@pytest.mark.parametrize(
    "shape",
    [
        (600, 1000),
        (1000, 600),
        (2100, 1000),
        (1100, 1000),
        (5000, 60),
        (60, 5000),
        (1, 300_000),
        (300_000, 1),
    ],
)
def test_fitting_the_gray_image_in_strips_is_bit_for_bit_the_float_path(shape: tuple[int, int]) -> None:
    """The decoder fits 8-bit gray a strip at a time (no full-size float copy); it must give exactly what
    fitting the float image gives, in both of Pillow 13's resampling pass orders (the vertical first
    when the height shrinks by more than twice what the width does)."""
    rng = np.random.default_rng(sum(shape))
    gray = np.zeros(shape, dtype=np.uint8)
    height, width = shape
    gray[height // 7 : height - height // 5, width // 9 : width - width // 6] = rng.integers(
        0, 256, (height - height // 5 - height // 7, width - width // 6 - width // 9), dtype=np.uint8
    )
    assert gray.size > preprocess.TILE_PIXELS or min(shape) == 1
    expected = preprocess._fit(preprocess._to_unit(gray))
    assert preprocess._fit_gray(gray.copy()).tobytes() == expected.tobytes()
    for target in [(20, 12), (3, 20), (20, 1), (1, 20), (31, 47)]:  # and upscaling a dimension
        resized = preprocess._lanczos_of_gray(gray, *target)
        direct = preprocess._resize(preprocess._to_unit(gray), *target, Image.Resampling.LANCZOS)
        assert resized.tobytes() == direct.tobytes(), target


def test_the_ink_threshold_on_gray_levels_is_the_float_comparison() -> None:
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    for peak in range(1, 256):
        gray = np.minimum(levels, peak).astype(np.uint8)
        for top in range(0, 16, 5):
            gray[:top] = 0
            assert preprocess._ink_box_gray(gray) == preprocess._ink_box(preprocess._to_unit(gray)), peak


def test_the_budget_serves_takers_in_order_and_times_out() -> None:
    budget = servicer.DecodeBudget(100)
    assert budget.take(80, 0)
    assert not budget.take(30, 0.05)  # no room
    got: list[bool] = []
    large = threading.Thread(target=lambda: got.append(budget.take(50, 5)))
    large.start()
    time.sleep(0.1)
    assert not budget.take(10, 0.1)  # it would fit, but the large taker came first
    budget.give_back(80)
    large.join(5)
    assert got == [True] and budget.in_use == 50
    assert budget.take(50, 0) and budget.in_use == 100


class _WaitingContext:
    """A servicer context whose call has `left` seconds before its deadline."""

    def __init__(self, left: float) -> None:
        self.deadline = time.monotonic() + left

    def time_remaining(self) -> float:
        return self.deadline - time.monotonic()

    def is_active(self) -> bool:
        return True

    def set_trailing_metadata(self, metadata: object) -> None:
        pass

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise RequestError(code, details)


def test_waiting_for_the_budget_never_outlasts_the_calls_deadline() -> None:
    encoder = servicer.EncoderServicer(
        load_runtime(shipped_model("default")),
        max_batch=8,
        max_image_bytes=10**7,
        max_image_pixels=10**8,
        decode_budget_mib=64,
        decode_wait_s=30,
    )
    assert encoder.budget.take(encoder.budget.capacity, 0)  # full: another call holds it all
    request = encoder_pb2.EmbedRequest(images=[encoder_pb2.Image(encoded=png_bomb(3000, 3000))])
    started = time.monotonic()
    with pytest.raises(RequestError) as caught:
        encoder.Embed(request, _WaitingContext(0.3))  # type: ignore[arg-type]
    assert 0.25 < time.monotonic() - started < 2
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert encoder._abandoned == 1

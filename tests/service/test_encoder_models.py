"""Several named models in one encoder process (--models) over real gRPC: each call picks its model, the
replies and Info name them, an unknown one is NOT_FOUND, dynamic batching never mixes two models, and the
parser refuses a bad list in one line. `--model` alone still serves one model."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from encoder_service.model_dir import SHIPPED_MODELS, shipped_model
from encoder_service.runtime import Runtime
from encoder_service.service import EncoderService, ModelSpec, parse_config
from imgsearch import wire
from imgsearch.v1 import encoder_pb2, encoder_pb2_grpc
from tests.support import address, mnist_sample, serve, start_encoder

SERVED = "default,fashion"
DIGITS = mnist_sample(6, start=8000)[0]  # uint8 [6, 28, 28], of the query split


@pytest.fixture(scope="module")
def encoder() -> Iterator[EncoderService]:
    yield from serve(start_encoder("--models", SERVED))


@pytest.fixture(scope="module")
def stub(encoder: EncoderService) -> Iterator[encoder_pb2_grpc.EncoderStub]:
    with grpc.insecure_channel(address(encoder)) as channel:
        yield encoder_pb2_grpc.EncoderStub(channel)


def raw(images: np.ndarray) -> list[encoder_pb2.Image]:
    return [
        encoder_pb2.Image(raw=encoder_pb2.RawPixels(height=x.shape[0], width=x.shape[1], pixels=x.tobytes()))
        for x in images
    ]


def embed(
    stub: encoder_pb2_grpc.EncoderStub, model: str, images: np.ndarray = DIGITS
) -> tuple[np.ndarray, str, str]:
    """(vectors, model_version, model) of one Embed call."""
    reply = stub.Embed(encoder_pb2.EmbedRequest(images=raw(images), model=model), timeout=30)
    return wire.unpack(reply.vectors, expected_count=len(images)), reply.model_version, reply.model


def expected(runtime: Runtime, images: np.ndarray = DIGITS) -> np.ndarray:
    """The runtime's vectors in process, for raw pixels as the service scales them."""
    return runtime.embed(images.astype(np.float32) / 255)


def test_each_call_gets_the_model_it_names(
    encoder: EncoderService, stub: encoder_pb2_grpc.EncoderStub
) -> None:
    default, fashion = encoder.runtimes["default"], encoder.runtimes["fashion"]
    assert default.model_dir == SHIPPED_MODELS / "default" and fashion.model_dir == SHIPPED_MODELS / "fashion"
    for asked in ("", "default"):
        vectors, version, model = embed(stub, asked)
        assert (model, version) == ("default", default.model_version)
        np.testing.assert_allclose(vectors, expected(default), atol=1e-6, rtol=0)
    vectors, version, model = embed(stub, "fashion")
    assert (model, version) == ("fashion", fashion.model_version) and version != default.model_version
    np.testing.assert_allclose(vectors, expected(fashion), atol=1e-6, rtol=0)
    assert not np.allclose(vectors, expected(default), atol=1e-2)
    with grpc.insecure_channel(address(encoder)) as channel:  # images_embedded counts every model
        info = encoder_pb2_grpc.EncoderStub(channel).Info(encoder_pb2.InfoRequest(), timeout=30)
    assert info.images_embedded >= 3 * len(DIGITS)


def test_an_encoder_of_fashion_alone_gives_the_same_vectors(stub: encoder_pb2_grpc.EncoderStub) -> None:
    """`--model fashion`, the one-model shorthand: its only model, the default, is fashion's."""
    alone = start_encoder("--model", "fashion")
    try:
        with grpc.insecure_channel(address(alone)) as channel:
            single = encoder_pb2_grpc.EncoderStub(channel)
            vectors, version, model = embed(single, "")
            assert embed(single, "fashion")[2] == "fashion"
            info = single.Info(encoder_pb2.InfoRequest(), timeout=30)
            with pytest.raises(grpc.RpcError) as caught:
                embed(single, "default")
    finally:
        alone.stop(0)
    served, served_version, _ = embed(stub, "fashion")
    assert (model, version) == ("fashion", served_version)
    np.testing.assert_allclose(vectors, served, atol=1e-6, rtol=0)
    assert [(m.name, m.model_version, m.is_default) for m in info.models] == [("fashion", version, True)]
    assert info.model_version == version
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert (
        caught.value.details()
        == "model 'default' is not served here; this encoder serves: fashion (--models)"
    )


def test_reconstruct_uses_the_named_models_decoder_and_input_shape(
    encoder: EncoderService, stub: encoder_pb2_grpc.EncoderStub
) -> None:
    fashion = encoder.runtimes["fashion"]
    height, width, _ = fashion.input_shape
    reply = stub.Reconstruct(encoder_pb2.ReconstructRequest(images=raw(DIGITS), model="fashion"), timeout=30)
    assert (reply.model, reply.model_version) == ("fashion", fashion.model_version)
    assert len(reply.items) == len(DIGITS)
    drawn = np.rint(np.clip(fashion.reconstruct(DIGITS.astype(np.float32) / 255), 0, 1) * 255).astype(
        np.uint8
    )
    for item, x, want in zip(reply.items, DIGITS, drawn, strict=True):
        for picture in (item.input, item.reconstruction):
            assert (picture.height, picture.width, len(picture.pixels)) == (height, width, height * width)
        assert np.array_equal(np.frombuffer(item.input.pixels, np.uint8).reshape(height, width), x)
        got = np.frombuffer(item.reconstruction.pixels, np.uint8).reshape(height, width).astype(int)
        assert np.abs(got - want).max() <= 1
    default = stub.Reconstruct(encoder_pb2.ReconstructRequest(images=raw(DIGITS[:1])), timeout=30)
    assert default.model == "default"
    assert default.items[0].reconstruction.pixels != reply.items[0].reconstruction.pixels
    with pytest.raises(grpc.RpcError) as caught:  # raw pixels of another size than the model's input
        stub.Reconstruct(
            encoder_pb2.ReconstructRequest(images=raw(np.zeros((1, 27, 28), np.uint8)), model="fashion"),
            timeout=30,
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "raw pixels must be 28 x 28 x 1 (the input of model 'fashion'), got 27 x 28 x 1" in (
        caught.value.details() or ""
    )


def test_info_lists_every_model_the_default_first(
    encoder: EncoderService, stub: encoder_pb2_grpc.EncoderStub
) -> None:
    info = stub.Info(encoder_pb2.InfoRequest(), timeout=30)
    assert [m.name for m in info.models] == ["default", "fashion"]
    assert [m.is_default for m in info.models] == [True, False]
    for listed in info.models:
        runtime = encoder.runtimes[listed.name]
        assert listed.model_version == runtime.model_version
        assert (listed.dim, list(listed.input_shape), listed.runtime) == (128, [28, 28, 1], "litert")
        assert json.loads(listed.card_json) == runtime.card
    assert json.loads(info.models[1].card_json)["dataset"] != json.loads(info.models[0].card_json)["dataset"]
    top = (info.model_version, info.dim, list(info.input_shape), info.runtime, info.card_json)
    first = info.models[0]
    assert top == (first.model_version, first.dim, list(first.input_shape), first.runtime, first.card_json)


@pytest.mark.parametrize("method", ["Embed", "Reconstruct"])
def test_an_unknown_model_is_not_found_naming_the_served_ones(
    stub: encoder_pb2_grpc.EncoderStub, method: str
) -> None:
    request = (encoder_pb2.EmbedRequest if method == "Embed" else encoder_pb2.ReconstructRequest)(
        images=raw(DIGITS[:1]), model="cats"
    )
    with pytest.raises(grpc.RpcError) as caught:
        getattr(stub, method)(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert (
        caught.value.details()
        == "model 'cats' is not served here; this encoder serves: default, fashion (--models)"
    )


def test_dynamic_batching_never_mixes_two_models(encoder: EncoderService) -> None:
    """With a batch window, calls for both models in flight at once: each gets its own model's vectors."""
    batching = start_encoder("--models", SERVED, "--batch-window-ms", "100")
    want = {name: expected(runtime) for name, runtime in encoder.runtimes.items()}
    calls = ["default", "fashion", "", "fashion", "default", "fashion"]
    results: dict[int, tuple[np.ndarray, str, str] | BaseException] = {}
    start = threading.Barrier(len(calls))
    try:
        with grpc.insecure_channel(address(batching)) as channel:
            stub = encoder_pb2_grpc.EncoderStub(channel)

            def call(n: int) -> None:
                start.wait(10)
                try:
                    results[n] = embed(stub, calls[n])
                except BaseException as error:  # reported below, not lost in the thread
                    results[n] = error

            threads = [threading.Thread(target=call, args=(n,)) for n in range(len(calls))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)
    finally:
        batching.stop(0)
    for n, asked in enumerate(calls):
        outcome = results[n]
        assert not isinstance(outcome, BaseException), outcome
        vectors, _, model = outcome
        assert model == (asked or "default")
        np.testing.assert_allclose(vectors, want[model], atol=1e-5, rtol=0)


def trained(tmp_path: Path, name: str = "mine") -> Path:
    """A model directory as `imgsearch train` writes it (the shipped tutorial's files, copied)."""
    model_dir = tmp_path / name
    shutil.copytree(shipped_model("tutorial"), model_dir)
    return model_dir


def test_models_are_named_by_shipped_name_folder_or_name_equals_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mine = trained(tmp_path)
    config = parse_config(["--models", f" fashion , {mine}/, cats={mine},tutorial", "--model", "default"])
    assert config.models == (
        ModelSpec("fashion", SHIPPED_MODELS / "fashion"),
        ModelSpec("mine", mine),
        ModelSpec("cats", mine),
        ModelSpec("tutorial", SHIPPED_MODELS / "tutorial"),
    ), "--models wins over --model"
    assert config.model_dir == SHIPPED_MODELS / "fashion"
    monkeypatch.chdir(tmp_path)
    assert parse_config(["--models", "./mine"]).models == (ModelSpec("mine", Path("mine")),)
    monkeypatch.setenv("IMGSEARCH_MODELS", "tutorial,default")
    assert [m.name for m in parse_config([]).models] == ["tutorial", "default"]
    monkeypatch.setenv("IMGSEARCH_MODELS", "")  # empty: unset, so --model applies
    assert parse_config(["--model", "fashion"]).models == (ModelSpec("fashion", SHIPPED_MODELS / "fashion"),)
    assert parse_config(["--model-dir", str(mine)]).models == (ModelSpec("mine", mine),)


def test_a_model_dir_and_a_name_equals_path_serve(tmp_path: Path) -> None:
    mine = trained(tmp_path)
    service = start_encoder("--models", f"{mine},cats={mine}")
    try:
        assert service.runtimes["mine"] is service.runtimes["cats"], "one directory loads once"
        with grpc.insecure_channel(address(service)) as channel:
            stub = encoder_pb2_grpc.EncoderStub(channel)
            assert [m.name for m in stub.Info(encoder_pb2.InfoRequest(), timeout=30).models] == [
                "mine",
                "cats",
            ]
            vectors, version, model = embed(stub, "cats")
    finally:
        service.stop(0)
    assert model == "cats" and version == service.runtimes["cats"].model_version
    np.testing.assert_allclose(vectors, expected(service.runtimes["cats"]), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("models", "said"),
    [
        ("default,fashion,default", "the model name 'default' is given twice (default, default)"),
        ("fashion,{tmp}/x/fashion", "the model name 'fashion' is given twice (fashion, {tmp}/x/fashion)"),
        (
            "default,cats",
            "no shipped model 'cats'; shipped: "
            "default, fashion, fashion-tutorial, icons, icons-ssl, tutorial",
        ),
        ("default,{tmp}/missing", "model 'missing': model directory {tmp}/missing does not exist"),
        ("empty={tmp}", "model 'empty': no card.json in model directory {tmp}"),
        ("bad name={tmp}/x/fashion", "'bad name' (bad name={tmp}/x/fashion) is not a model name"),
        ("cats=", "'cats=' gives no directory after '='"),
        (" , ", "' , ' names no model"),
    ],
)
def test_a_bad_model_list_is_one_parser_error(
    models: str, said: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trained(tmp_path / "x", "fashion")
    with pytest.raises(SystemExit) as exited:
        parse_config(["--models", models.format(tmp=tmp_path)])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("python -m encoder_service: error: --models: ")
    assert said.format(tmp=tmp_path) in err[-1]
    assert not any("Traceback" in line for line in err)


def test_a_model_of_another_input_shape_is_refused_at_start(tmp_path: Path) -> None:
    """The preprocessing makes 28 x 28 x 1 images: a model that takes others stops the service at start
    (in one line), not each call."""
    odd = tmp_path / "odd"
    odd.mkdir()
    shutil.copy(shipped_model("tutorial") / "encoder.tflite", odd)
    card = json.loads((shipped_model("tutorial") / "card.json").read_text())
    (odd / "card.json").write_text(json.dumps({**card, "input_shape": [32, 32, 1]}))
    with pytest.raises(SystemExit) as exited:
        EncoderService(parse_config(["--port", "0", "--models", f"default,{odd}"]))
    assert str(exited.value) == (
        "encoder_service: cannot serve the model: model 'odd' takes 32 x 32 x 1 inputs, but the "
        "digits preprocessing makes every image 28 x 28 x 1"
    )

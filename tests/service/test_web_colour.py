"""The page's model views in colour, over real HTTP: the web gateway against an encoder serving a colour
`photo` model (32x32x3, built here untrained: the shapes and the path are what is tested, not its quality)
beside the digits model, and a FAISS index with a collection of each. A search or an item in the photo
collection shows the model input and reconstruction as RGB PNGs at 32x32, exactly the encoder's pixels;
the digits collection's stay grayscale 28x28. Also `png_data_url` on each shape it takes and refuses, and
an encoder whose pixels are neither grayscale nor RGB getting a note instead of a view."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import grpc
import numpy as np
import pytest
from PIL import Image

from imgsearch.client import ImageSearch
from imgsearch.v1 import encoder_pb2, encoder_pb2_grpc
from tests.support import (
    Gateway,
    address,
    index_folder,
    mnist_sample,
    png,
    request,
    start_encoder,
    start_index,
    upload_search,
    write_digits,
    write_photo_model,
)
from web.media import png_data_url
from web.settings import Settings

SHAPE = (32, 32, 3)
PHOTOS = 6
DIGITS = 10


@dataclass
class Stack:
    url: str
    search: ImageSearch
    photos: dict[str, Path]  # id -> image file


def scene(seed: int, size: tuple[int, int] = (90, 60)) -> np.ndarray:
    """A colour picture of its own (a coloured box on a coloured ground), [height, width, 3]."""
    rng = np.random.default_rng(seed)
    pixels = np.empty((size[1], size[0], 3), np.uint8)
    pixels[:] = rng.integers(0, 255, 3)
    top, left = rng.integers(5, 25, 2)
    pixels[top : top + 20, left : left + 30] = rng.integers(0, 255, 3)
    return pixels


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("web-colour")
    model = write_photo_model(tmp_path_factory.mktemp("photo-model"))
    media = tmp / "media"
    write_digits(media / "digits", DIGITS)
    photos = {}
    for n in range(PHOTOS):
        path = media / "photos" / f"{n}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png(scene(n)))
        photos[f"photos/{n}.png"] = path

    encoder = start_encoder("--models", f"default,photo={model}")  # digits the default
    try:
        index = start_index(tmp / "index")
    except BaseException:
        encoder.stop(0)
        raise
    search = ImageSearch(address(encoder), address(index), 30)
    try:
        index_folder(search, media / "digits")  # the default collection, by the digits model
        search.index.create_collection("photos", "photo")
        search.add(
            list(photos),
            [path.read_bytes() for path in photos.values()],
            [{"label": "photo", "source": str(path)} for path in photos.values()],
            collection="photos",
        )
        settings = Settings(encoder=address(encoder), index=address(index), media_root=media.resolve())
        with Gateway(settings) as gateway:
            yield Stack(gateway.url, search, photos)
    finally:
        search.close()
        index.stop(0)
        encoder.stop(0)


upload = upload_search


def decoded(data_url: str | None) -> Image.Image:
    assert data_url and data_url.startswith("data:image/png;base64,"), (data_url or "")[:40]
    image = Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1])))
    assert image.format == "PNG"
    image.load()
    return image


def test_a_search_in_the_photo_collection_shows_the_query_in_colour(stack: Stack) -> None:
    query = png(scene(100, (80, 50)))  # not stored, and not the model's shape: the encoder fits it
    reply = upload(stack.url, query, "photos")
    assert reply.status == 200, reply.body
    found = reply.json()
    assert (found["collection"], found["model"]) == ("photos", "photo")
    assert found["results"] and {r["id"] for r in found["results"]} <= set(stack.photos)
    view = found["query"]
    assert view["note"] is None
    model_input, reconstruction = decoded(view["input"]), decoded(view["reconstruction"])
    for image in (model_input, reconstruction):
        assert (image.mode, image.size) == ("RGB", (32, 32))
    [direct] = stack.search.encoder.reconstruct([query], model="photo")
    assert direct.input.shape == direct.output.shape == SHAPE
    assert np.array_equal(np.asarray(model_input), direct.input)  # exactly the encoder's pixels
    assert np.array_equal(np.asarray(reconstruction), direct.output)
    channels = np.asarray(model_input).reshape(-1, 3)
    assert not (channels == channels[:, :1]).all()  # colour, not gray in RGB clothing


def test_a_result_in_the_photo_collection_shows_its_view_in_colour(stack: Stack) -> None:
    item_id, path = next(iter(stack.photos.items()))
    found = upload(stack.url, path.read_bytes(), "photos").json()
    assert found["results"][0]["id"] == item_id
    assert found["results"][0]["distance"] == pytest.approx(0, abs=1e-3)
    reply = request(f"{stack.url}/api/items?id={quote(item_id, safe='')}&collection=photos")
    assert reply.status == 200, reply.body
    item = reply.json()
    assert item["collection"] == "photos" and item["view"]["note"] is None
    model_input, reconstruction = decoded(item["view"]["input"]), decoded(item["view"]["reconstruction"])
    for image in (model_input, reconstruction):
        assert (image.mode, image.size) == ("RGB", (32, 32))
    [direct] = stack.search.encoder.reconstruct([path.read_bytes()], model="photo")
    assert np.array_equal(np.asarray(model_input), direct.input)
    assert np.array_equal(np.asarray(reconstruction), direct.output)
    # The query's view and the result's are the same image's here: the page shows them alike.
    assert found["query"]["input"] == item["view"]["input"]


def test_the_digits_collection_beside_it_stays_grayscale_28x28(stack: Stack) -> None:
    x, _ = mnist_sample(1, 9000)
    found = upload(stack.url, png(x[0])).json()
    assert (found["collection"], found["model"]) == ("default", "default")
    views = [found["query"]]
    first = found["results"][0]["id"]
    item = request(f"{stack.url}/api/items?id={quote(first, safe='')}").json()
    views.append(item["view"])
    for view in views:
        assert view["note"] is None
        for image in (decoded(view["input"]), decoded(view["reconstruction"])):
            assert (image.mode, image.size) == ("L", (28, 28))
    # A colour image searched in the digits collection is still shown as the digits model sees it.
    colour = upload(stack.url, png(scene(7)))
    assert colour.status == 200, colour.body
    assert decoded(colour.json()["query"]["input"]).mode == "L"


class FourChannels(encoder_pb2_grpc.EncoderServicer):
    """An encoder from elsewhere whose Reconstruct answers 4-channel (RGBA-like) pixels."""

    def Reconstruct(
        self, request: encoder_pb2.ReconstructRequest, context: grpc.ServicerContext
    ) -> encoder_pb2.ReconstructResponse:
        pixels = encoder_pb2.RawPixels(height=8, width=8, channels=4, pixels=bytes(8 * 8 * 4))
        item = encoder_pb2.Reconstruction(input=pixels, reconstruction=pixels)
        return encoder_pb2.ReconstructResponse(items=[item] * len(request.images), model=request.model)


def test_pixels_of_another_shape_get_a_note_not_an_error(tmp_path: Path) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    encoder_pb2_grpc.add_EncoderServicer_to_server(FourChannels(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    index = start_index(tmp_path / "index")
    search = ImageSearch(f"127.0.0.1:{port}", address(index), 30)
    try:
        source = tmp_path / "media" / "a.png"
        source.parent.mkdir()
        source.write_bytes(png(scene(1)))
        vector = np.random.default_rng(0).standard_normal((1, 128)).astype(np.float32)
        search.index.upsert(["a"], vector, [{"source": str(source)}], "m1", model_name="default")
        settings = Settings(
            encoder=f"127.0.0.1:{port}", index=address(index), media_root=source.parent.resolve()
        )
        with Gateway(settings) as gateway:
            reply = request(f"{gateway.url}/api/items?id=a")
        assert reply.status == 200, reply.body
        view = reply.json()["view"]
        assert view["input"] is None and view["reconstruction"] is None
        assert "cannot be shown" in view["note"] and "[8, 8, 4]" in view["note"], view["note"]
    finally:
        search.close()
        index.stop(0)
        server.stop(0)


# png_data_url: the shapes it takes, and those it refuses.


@pytest.mark.parametrize(
    ("shape", "mode"),
    [((28, 28), "L"), ((28, 28, 1), "L"), ((32, 32, 3), "RGB"), ((5, 9, 3), "RGB"), ((7, 3), "L")],
)
def test_png_data_url_gives_a_png_of_the_right_mode_and_size(shape: tuple[int, ...], mode: str) -> None:
    pixels = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    image = decoded(png_data_url(pixels))
    assert image.mode == mode and image.size == (shape[1], shape[0])  # width x height: aspect kept
    assert np.array_equal(np.asarray(image), pixels.reshape(shape[:2]) if mode == "L" else pixels)


def test_png_data_url_takes_a_non_contiguous_view() -> None:
    pixels = np.random.default_rng(2).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    bgr = pixels[:, ::2, ::-1]
    assert np.array_equal(np.asarray(decoded(png_data_url(bgr))), bgr)


@pytest.mark.parametrize(
    ("pixels", "match"),
    [
        (np.zeros((4, 4, 4), np.uint8), r"\[h, w\], \[h, w, 1\] or \[h, w, 3\], not \[4, 4, 4\]"),
        (np.zeros((4, 4, 2), np.uint8), r"not \[4, 4, 2\]"),
        (np.zeros(16, np.uint8), r"not \[16\]"),
        (np.zeros((1, 4, 4, 3), np.uint8), r"not \[1, 4, 4, 3\]"),
        (np.zeros((0, 4), np.uint8), "no image"),
        (np.zeros((4, 0, 3), np.uint8), "no image"),
        (np.zeros((4, 4, 3), np.float32), "uint8, not float32"),
        (np.zeros((4, 4), np.uint16), "uint8, not uint16"),
    ],
)
def test_png_data_url_refuses_other_shapes(pixels: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        png_data_url(pixels)

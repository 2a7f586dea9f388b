"""The near-duplicate distance D of a model, measured: how far a re-encoded copy of an image lands from the
image itself, against how far the nearest different image lies; and the "nothing close" factor.

    decode = decoder_for(runtime.preprocess, runtime.input_shape)  # decode_image for a digits model
    measurement = measure(runtime.embed, images, labels, outside=other_images, decode=decode)
    card.update(measurement.card_entries("encoder_service/data/mnist-10k.npz"))

Every image, original or copy, is an encoded file decoded as the encoder service decodes it for the model
(`decoder_for` its card's `preprocess`: `encoder_service.preprocess.decode_image` for "digits", the
default; `encoder_service.photo.decode_photo` at the model's input shape for "photo") and then embedded;
distances are L2 between embeddings, as the index service's `Duplicates` and `Search` report them. The
images are uint8 [N, H, W] (gray) or [N, H, W, 3] (RGB), of any size; the files are gray or RGB to match.

- Copies: a seeded sample of COPY_SAMPLE images of the pool, each made again every way in COPIES (JPEG at
  quality 95, 85 and 75, WebP lossy and lossless, a PNG re-saved as RGB, pixel-doubling upscales, smooth
  up- and downscales given to the encoder at their size, each a multiple of the image's own width and
  height); each copy's distance to its original.
- Nearest distinct: for every image of the pool, the distance to its nearest other image of the pool,
  and (with labels) to its nearest other image of the same class.
- D sits in the gap between the copies and the nearest distinct images: a kind of copy is *caught* when
  its 99th percentile is below the nearest distinct images' 1st percentile (no D can catch the others
  without linking about 1% of the images to a different one: they are listed as not caught); D is the
  geometric mean of the caught kinds' largest 99th percentile and that 1st percentile (the middle of the
  gap on a log scale), rounded to two significant figures inside it. So at least 99% of each caught kind
  is within D and at most 1% of the images has a different image within D.
- Nothing close: the pool splits as `make demo` indexes it, the first 80% the index and the last 20% the
  queries, and each query's nearest index image is found. `nothing_close_factor` x D is the distance past
  which a search's nearest result is "nothing close": at most 1% of these in-domain queries lie past it
  (the factor is their 99th percentile over D, rounded up to a half). Images of another domain (`outside`:
  the Fashion-MNIST sample for a digit model, digits for a clothes model) are searched the same way, and
  the share of them past it is recorded: how often the notice fires where it should.

Deterministic: the samples are drawn with a seeded numpy rng. numpy, Pillow and the preprocessing only (no
TensorFlow, no FAISS): training (`encoder_service.train`) and `tools/duplicate_distance.py` share it.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from encoder_service.photo import decode_photo
from encoder_service.preprocess import decode_image
from encoder_service.shapes import check_input_shape

# The decoded images, stacked, to their embeddings: float32 [N, 28, 28] in [0, 1] (what decode_image makes,
# the "digits" preprocessing) or [N, H, W, C] (decode_photo at the model's input shape, "photo") ->
# float32 [N, dim]. A runtime's `embed` takes both.
Embed = Callable[[np.ndarray], np.ndarray]
# An encoded image file to the model's input: float32 [28, 28] (decode_image) or [H, W, C] (decode_photo).
Decode = Callable[[bytes], np.ndarray]
PREPROCESSINGS = ("digits", "photo")  # the card's `preprocess` values decoder_for knows

DATA = Path(__file__).parent / "data"
MNIST_SAMPLE = DATA / "mnist-10k.npz"
FASHION_SAMPLE = DATA / "fashion-3k.npz"

COPY_SAMPLE = 300  # images copied, each every way in COPIES
MAX_POOL = 10_000  # images compared for the nearest distinct (a seeded sample of a larger dataset)
QUERY_SHARE = 0.2  # the last 20% of the pool are the queries of the nothing-close measurement
MAX_OUTSIDE = 3_000  # images of another domain searched for the nothing-close measurement
COPIES_WITHIN = 99.0  # percent of each caught kind of copy within D
DISTINCT_WITHIN = 1.0  # percent of the nearest distinct images within D
QUERIES_PAST = 1.0  # percent of in-domain queries whose nearest index image lies past D x factor
COPY_PERCENTILES = (50.0, 99.0)  # those the card records (the tool prints more)
DISTINCT_PERCENTILES = (0.1, 1.0, 10.0, 50.0)
NEAREST_PERCENTILES = (1.0, 50.0, 99.0, 100.0)
_CHUNK = 1024  # rows of the distance matrix at a time


def _encoded(image: Image.Image, format_name: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format_name, **options)
    return buffer.getvalue()


def scaled_size(size: tuple[int, int], factor: float) -> tuple[int, int]:
    """A (width, height) times factor, each side rounded half up (at least 1 pixel): (28, 28) x 0.75 is
    (21, 21), (30, 30) x 0.75 is (23, 23)."""
    width, height = size
    return max(1, math.floor(width * factor + 0.5)), max(1, math.floor(height * factor + 0.5))


def _resized(
    image: Image.Image, factor: float, resample: Image.Resampling, format_name: str = "PNG", **options: Any
) -> bytes:
    return _encoded(image.resize(scaled_size(image.size, factor), resample), format_name, **options)


_NEAREST, _LANCZOS, _BICUBIC = Image.Resampling.NEAREST, Image.Resampling.LANCZOS, Image.Resampling.BICUBIC

# How a copy is made from the original (an 8-bit gray or RGB image of any size: 28x28 gray for a digits
# model): what a re-upload, a format conversion or a resizer does to a file. The resized ones are a multiple
# of the original's own width and height (for 28x28: 56, 280, 56, 112 and 21 pixels; for 32x32: 64, 320,
# 64, 128 and 24) and reach the encoder at their size, which fits them to the model's input again
# (decode_image: the ink's box to 20 px of 28x28, centred; decode_photo: padded and resized to H x W):
# pixel-doubling upscales by an integer factor, and smooth resamplings, which blur the image (and widen a
# glyph's box by about a pixel). For an RGB original "PNG re-saved as RGB" is the PNG itself. The kinds'
# names are recorded in model cards: keep them.
COPIES: dict[str, Callable[[Image.Image], bytes]] = {
    "JPEG q95": lambda image: _encoded(image, "JPEG", quality=95),
    "JPEG q85": lambda image: _encoded(image, "JPEG", quality=85),
    "JPEG q75": lambda image: _encoded(image, "JPEG", quality=75),
    "WebP lossy q80": lambda image: _encoded(image, "WEBP", quality=80),
    "WebP lossless": lambda image: _encoded(image, "WEBP", lossless=True),
    "PNG re-saved as RGB": lambda image: _encoded(image.convert("RGB"), "PNG"),
    "2x nearest, PNG": lambda image: _resized(image, 2, _NEAREST),
    "10x nearest, PNG": lambda image: _resized(image, 10, _NEAREST),
    "2x Lanczos, PNG": lambda image: _resized(image, 2, _LANCZOS),
    "4x bicubic, JPEG q85": lambda image: _resized(image, 4, _BICUBIC, "JPEG", quality=85),
    "0.75x Lanczos, PNG": lambda image: _resized(image, 0.75, _LANCZOS),
}


def decoder_for(preprocess: str, input_shape: tuple[int, int, int]) -> Decode:
    """How the encoder service decodes an image for a model whose card's `preprocess` is this and whose
    input is input_shape: decode_image for "digits" (always 28x28 gray: the shape is not used), decode_photo
    at the shape for "photo". ValueError for another preprocessing or a shape the models cannot take."""
    if preprocess == "digits":
        return decode_image
    if preprocess == "photo":
        height, width, channels = (int(side) for side in input_shape)
        shape = check_input_shape((height, width, channels))

        def decode(data: bytes) -> np.ndarray:
            return decode_photo(data, shape)

        decode.__name__ = decode.__qualname__ = "decode_photo"  # as the card's measurement names it
        return decode
    known = ", ".join(repr(name) for name in PREPROCESSINGS)
    raise ValueError(f"unknown preprocessing {preprocess!r}: known are {known}")


def _image_of(pixels: np.ndarray) -> Image.Image:
    """A uint8 [H, W] or [H, W, 1] image as a gray ("L") Pillow image, [H, W, 3] as an RGB one."""
    pixels = np.asarray(pixels, np.uint8)
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[..., 0]
    if pixels.ndim == 2:
        return Image.fromarray(pixels, "L")
    if pixels.ndim == 3 and pixels.shape[2] == 3:
        return Image.fromarray(np.ascontiguousarray(pixels), "RGB")
    raise ValueError(f"an image is uint8 [H, W] (gray) or [H, W, 3] (RGB), got shape {pixels.shape}")


def png_bytes(pixels: np.ndarray) -> bytes:
    """A uint8 [H, W] (gray) or [H, W, 3] (RGB) image as a PNG file of that mode."""
    return _encoded(_image_of(pixels), "PNG")


def copy_bytes(pixels: np.ndarray, kind: str) -> bytes:
    """A uint8 [H, W] (gray) or [H, W, 3] (RGB) image made again as COPIES[kind] makes it."""
    return COPIES[kind](_image_of(pixels))


def embed_files(embed: Embed, files: list[bytes], decode: Decode = decode_image) -> np.ndarray:
    """Encoded images decoded by `decode` (as the encoder service decodes them for the model: see
    decoder_for), stacked and embedded: float32 [N, dim]."""
    if not files:
        raise ValueError("no images to embed")
    return np.asarray(embed(np.stack([decode(data) for data in files])), np.float32)


def outside_sample(dataset: str, preprocess: str = "digits") -> tuple[np.ndarray, str] | None:
    """Images of another domain than the dataset's (by its name), and what they are: the shipped
    Fashion-MNIST sample for digits, the MNIST sample for clothes and for a photo model (gray digits, which
    its preprocessing turns into its colour input); None for any other dataset. uint8 [N, 28, 28]."""
    name = dataset.lower().replace("-", "_")
    if preprocess == "photo":
        path: Path | None = MNIST_SAMPLE
    else:
        path = (
            FASHION_SAMPLE
            if name.startswith("mnist")
            else MNIST_SAMPLE
            if name.startswith("fashion")
            else None
        )
    if path is None or not path.is_file():
        return None
    with np.load(path) as data:
        return np.asarray(data["x"][:MAX_OUTSIDE]), f"encoder_service/data/{path.name}"


def decoded(images: np.ndarray, decode: Decode) -> np.ndarray:
    """uint8 images as PNG files through `decode`: what a model of that preprocessing takes of them."""
    return np.stack([decode(png_bytes(image)) for image in images]).astype(np.float32)


@dataclass
class Measurement:
    """What `measure` found: the distances (arrays, for the tool's figures) and the values chosen."""

    pool: int  # images compared for the nearest distinct
    copied: int  # images copied, each every way in COPIES
    copy_distances: dict[str, np.ndarray]  # by kind: each copy to its original
    nearest_distinct: np.ndarray  # each pool image to its nearest other pool image
    nearest_same_class: np.ndarray | None  # each pool image to its nearest other pool image of its class
    query_nearest: np.ndarray  # each query to its nearest index image (queries and index split the pool)
    query_same_class: np.ndarray | None  # whether that nearest index image is of the query's class
    outside_nearest: np.ndarray | None  # each image of another domain to its nearest index image
    caught: list[str]  # the kinds of copy D is placed above
    duplicate_distance: float
    nothing_close_factor: float
    notes: list[str] = field(default_factory=list)
    decoded_by: str = "decode_image"  # the decode's name, for the card's measurement

    @property
    def nothing_close_distance(self) -> float:
        return self.duplicate_distance * self.nothing_close_factor

    def within(self, kind: str) -> float:
        """The share of the kind's copies within D."""
        return float(np.mean(self.copy_distances[kind] <= self.duplicate_distance))

    def rates(self) -> dict[str, float]:
        """The shares that D and D x factor give on the measured data."""
        d, far = self.duplicate_distance, self.nothing_close_distance
        rates = {}
        if self.caught:
            caught = np.concatenate([self.copy_distances[kind] for kind in self.caught])
            rates["caught_copies_within_d"] = float(np.mean(caught <= d))
        rates["nearest_distinct_within_d"] = float(np.mean(self.nearest_distinct <= d))
        if self.nearest_same_class is not None:
            rates["nearest_same_class_within_d"] = float(np.mean(self.nearest_same_class <= d))
        past = self.query_nearest > far
        rates["queries_past_nothing_close"] = float(np.mean(past))
        if self.query_same_class is not None:
            rates["query_nearest_same_class"] = float(np.mean(self.query_same_class))
            if past.any():
                rates["query_nearest_same_class_past_nothing_close"] = float(
                    np.mean(self.query_same_class[past])
                )
        if self.outside_nearest is not None:
            rates["outside_past_nothing_close"] = float(np.mean(self.outside_nearest > far))
        return rates

    def card_entries(self, images: str = "", outside: str = "") -> dict[str, Any]:
        """The card's keys: `duplicate_distance`, `nothing_close_factor`, and
        `duplicate_distance_measurement` (what they were measured on, the percentiles, the shares)."""
        measured: dict[str, Any] = {
            "images": images or "the training dataset",
            "path": (
                f"each image an encoded file through {self.decoded_by} and the model; L2 between embeddings"
            ),
            "pool": self.pool,
            "copied": self.copied,
            "rule": (
                f"D: the geometric mean of the caught kinds' largest p{COPIES_WITHIN:g} and the nearest "
                f"distinct images' p{DISTINCT_WITHIN:g} (a kind is caught when its p{COPIES_WITHIN:g} is "
                f"below that p{DISTINCT_WITHIN:g}); nothing close: past D x nothing_close_factor, the "
                f"in-domain queries' p{100 - QUERIES_PAST:g} nearest distance over D, rounded up to a half"
            ),
            "caught": list(self.caught),
            "not_caught": [kind for kind in self.copy_distances if kind not in self.caught],
            "copies": {
                kind: {**_percentiles(distances, COPY_PERCENTILES), "within_d": round(self.within(kind), 4)}
                for kind, distances in self.copy_distances.items()
            },
            "nearest_distinct": _percentiles(self.nearest_distinct, DISTINCT_PERCENTILES),
        }
        if self.nearest_same_class is not None:
            measured["nearest_same_class"] = _percentiles(self.nearest_same_class, DISTINCT_PERCENTILES)
        measured["queries"] = len(self.query_nearest)
        measured["query_nearest"] = _percentiles(self.query_nearest, NEAREST_PERCENTILES)
        if self.outside_nearest is not None:
            measured["outside"] = outside or "images of another domain"
            measured["outside_count"] = len(self.outside_nearest)
            measured["outside_nearest"] = _percentiles(self.outside_nearest, NEAREST_PERCENTILES)
        measured["rates"] = {key: round(value, 4) for key, value in self.rates().items()}
        if self.notes:
            measured["notes"] = list(self.notes)
        return {
            "duplicate_distance": self.duplicate_distance,
            "nothing_close_factor": self.nothing_close_factor,
            "duplicate_distance_measurement": measured,
        }


def measure(
    embed: Embed,
    images: np.ndarray,
    labels: np.ndarray | None = None,
    *,
    outside: np.ndarray | None = None,
    copies: int = COPY_SAMPLE,
    max_pool: int = MAX_POOL,
    seed: int = 0,
    decode: Decode = decode_image,
) -> Measurement:
    """Measures D and the nothing-close factor of the encoder `embed` on uint8 images, [N, H, W] (gray:
    [N, 28, 28] light on dark for a digits model) or [N, H, W, 3] (RGB), in their order (a seeded sample
    of max_pool of them, in order, when there are more), with their class labels when there are any
    (None: the nearest distinct image only), and `outside` images of another domain when there are any
    (gray or RGB, of any size). Each file is decoded by `decode` (default decode_image, the digits
    preprocessing; `decoder_for(card["preprocess"], input_shape)` for any model) and `embed` gets the
    decoded arrays stacked."""
    images = np.asarray(images)
    shaped = images.ndim == 3 or (images.ndim == 4 and images.shape[3] in (1, 3))
    if not shaped or len(images) < 2:
        raise ValueError(f"need at least 2 images [N, H, W] or [N, H, W, 3], got shape {images.shape}")
    if labels is not None:
        labels = np.asarray(labels)
        if len(labels) != len(images):
            raise ValueError(f"{len(labels)} labels for {len(images)} images")
    rng = np.random.default_rng(seed)
    if len(images) > max_pool:
        chosen = np.sort(rng.choice(len(images), max_pool, replace=False))
        images = images[chosen]
        labels = labels[chosen] if labels is not None else None
    if labels is not None and len(np.unique(labels)) < 2:
        labels = None  # one class: its nearest same-class image is the nearest distinct one
    vectors = embed_files(embed, [png_bytes(image) for image in images], decode)

    sample = np.sort(rng.choice(len(images), min(copies, len(images)), replace=False))
    copy_distances = {
        kind: _norms(
            embed_files(embed, [copy_bytes(images[i], kind) for i in sample], decode) - vectors[sample]
        )
        for kind in COPIES
    }
    nearest_distinct = _nearest(vectors, vectors, exclude_self=True)[1]
    nearest_same_class = None
    if labels is not None:
        same = np.full(len(images), np.nan)
        for label in np.unique(labels):
            members = np.flatnonzero(labels == label)
            if len(members) > 1:
                same[members] = _nearest(vectors[members], vectors[members], exclude_self=True)[1]
        nearest_same_class = same[~np.isnan(same)]

    split = len(images) - max(1, round(len(images) * QUERY_SHARE))
    found, query_nearest = _nearest(vectors[split:], vectors[:split], exclude_self=False)
    query_same_class = None if labels is None else labels[split:] == labels[:split][found]
    outside_nearest = None
    if outside is not None and len(outside):
        outside_vectors = embed_files(embed, [png_bytes(image) for image in outside], decode)
        outside_nearest = _nearest(outside_vectors, vectors[:split], exclude_self=False)[1]

    caught, distance = choose_distance(copy_distances, nearest_distinct)
    factor = nothing_close_factor(query_nearest, distance)
    notes = []
    if len(caught) < len(copy_distances):
        notes.append(
            "not caught: kinds whose p99 is past the nearest distinct images' p1, so that no D catches "
            "them without linking different images"
        )
    return Measurement(
        pool=len(images),
        copied=len(sample),
        copy_distances=copy_distances,
        nearest_distinct=nearest_distinct,
        nearest_same_class=nearest_same_class,
        query_nearest=query_nearest,
        query_same_class=query_same_class,
        outside_nearest=outside_nearest,
        caught=caught,
        duplicate_distance=distance,
        nothing_close_factor=factor,
        notes=notes,
        decoded_by=_name_of(decode),
    )


def choose_distance(copies: dict[str, np.ndarray], distinct: np.ndarray) -> tuple[list[str], float]:
    """(the kinds of copy caught, D): see the module's docstring. Images identical to another in the
    pool (distance 0) are left out of the nearest distinct: they are duplicates themselves."""
    distinct = distinct[distinct > 0]
    if not len(distinct):
        return [], 0.0
    high = float(np.percentile(distinct, DISTINCT_WITHIN))
    lows = {kind: float(np.percentile(d, COPIES_WITHIN)) for kind, d in copies.items()}
    caught = [kind for kind, low in lows.items() if low < high]
    low = max((lows[kind] for kind in caught), default=0.0)
    middle = math.sqrt(low * high) if low > 0 else high / 2
    for digits in (2, 3, 4):
        rounded = _significant(middle, digits)
        if low < rounded < high:
            return caught, rounded
    return caught, middle


def nothing_close_factor(query_nearest: np.ndarray, distance: float) -> float:
    """The multiple of D past which at most QUERIES_PAST percent of the in-domain queries' nearest image
    lies, rounded up to a half (at least 1)."""
    far = float(np.percentile(query_nearest, 100 - QUERIES_PAST))
    if distance <= 0:
        return 1.0
    return max(1.0, math.ceil(2 * far / distance - 1e-9) / 2)


def _nearest(queries: np.ndarray, base: np.ndarray, exclude_self: bool) -> tuple[np.ndarray, np.ndarray]:
    """Each query's nearest base row (its own row excluded when the queries are the base) and the exact
    L2 distance to it (float64; the search in float32)."""
    base = np.asarray(base, np.float32)
    squares = (base**2).sum(axis=1)
    found = np.empty(len(queries), np.int64)
    for start in range(0, len(queries), _CHUNK):
        part = np.asarray(queries[start : start + _CHUNK], np.float32)
        squared = squares[None, :] - 2 * part @ base.T + (part**2).sum(axis=1)[:, None]
        if exclude_self:
            own = np.arange(len(part))
            squared[own, start + own] = np.inf
        found[start : start + len(part)] = np.argmin(squared, axis=1)
    return found, _norms(np.asarray(queries, np.float64) - base[found])


def _name_of(decode: Decode) -> str:
    name = getattr(decode, "__name__", "")
    return name if name and name != "<lambda>" else "the model's decode"


def _norms(differences: np.ndarray) -> np.ndarray:
    return np.sqrt((np.asarray(differences, np.float64) ** 2).sum(axis=1))


def _significant(value: float, digits: int) -> float:
    if value <= 0:
        return 0.0
    return round(value, digits - 1 - math.floor(math.log10(value)))


def _percentiles(values: np.ndarray, percentiles: tuple[float, ...]) -> dict[str, float]:
    names = {100.0: "max"}
    return {names.get(p, f"p{p:g}"): _significant(float(np.percentile(values, p)), 4) for p in percentiles}

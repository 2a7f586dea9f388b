"""Finding image files, and indexing them in batches through both services."""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TypeVar

import grpc
import numpy as np

from imgsearch.client import BadImage, Embedding, EncoderClient, ImageSearch, IndexClient, ServiceError

SOURCE_KEY = "source"  # the metadata key every indexed image's absolute path is stored under
LABEL_KEY = "label"  # the metadata key of its parent folder's name
# The metadata key of an indexed image's novelty by the model that embedded it (rounded, as a string),
# where the encoder gives one: above 1, it looks unlike the model's training data.
NOVELTY_KEY = "novelty"
NOVEL_ABOVE = 1.0  # a novelty above this: unlike the model's training data
COLLISIONS_NAMED = 5  # replaced items of another source an ingest names (it counts them all)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
DEFAULT_BATCH_SIZE = 256
DEFAULT_PATIENCE_S = 60.0
DEFAULT_IN_FLIGHT = 2  # batches read and embedded ahead of the one being upserted (the CLI adds replicas)
T = TypeVar("T")


@dataclass(frozen=True)
class ImageFile:
    id: str  # the path relative to the folder given (after any --id-prefix), or the file name for a file
    path: Path
    label: str  # the parent folder's name

    @property
    def metadata(self) -> dict[str, str]:
        return {LABEL_KEY: self.label, SOURCE_KEY: str(self.path)}


@dataclass(frozen=True)
class TaggedImage(ImageFile):
    """An image file with more metadata (`imgsearch index --meta`): it wins over `label`, never `source`."""

    extra: tuple[tuple[str, str], ...] = ()

    @property
    def metadata(self) -> dict[str, str]:
        return {LABEL_KEY: self.label, **dict(self.extra), SOURCE_KEY: str(self.path)}


@dataclass(frozen=True)
class Collision:
    """A stored item an ingest replaced whose `source` was another file: two files, one id."""

    id: str
    was: str  # the stored item's source ("" when it had none)
    now: str  # the file that replaced it


@dataclass
class IngestReport:
    indexed: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (absolute path, reason)
    count: int = 0  # items in the index afterwards
    by_replica: dict[str, int] = field(default_factory=dict)  # images indexed, by the encoder replica
    replaced_other_source: int = 0  # stored items replaced whose `source` was another file
    collisions: list[Collision] = field(default_factory=list)  # the first COLLISIONS_NAMED of them
    scored: int = 0  # images indexed with a novelty (the encoder gave one)
    novel: int = 0  # of them, those above NOVEL_ABOVE: unlike the model's training data


def novelty_text(value: float) -> str:
    """A novelty as the metadata stores it: two decimals (`0.43`, `3.10`)."""
    return f"{value:.2f}"


def with_novelty(metadata: Mapping[str, str], novelty: float | None) -> dict[str, str]:
    """The metadata with the image's novelty under NOVELTY_KEY (replacing any there: it belongs to the
    model that embedded the image); unchanged when there is none."""
    if novelty is None:
        return dict(metadata)
    return {**metadata, NOVELTY_KEY: novelty_text(novelty)}


def labelled(
    files: Sequence[ImageFile], id_prefix: str = "", extra: Mapping[str, str] | None = None
) -> list[ImageFile]:
    """The files with `id_prefix` put before every id (verbatim: `albumA/` gives `albumA/trip/1.png`) and
    `extra` metadata added to each (`imgsearch index --id-prefix P --meta KEY=VALUE`). ValueError for a
    `source` key in extra: that is the file's path, which reindex and the collision check rely on."""
    extras = tuple((extra or {}).items())
    for key, _ in extras:
        if not key:
            raise ValueError("a metadata key cannot be empty")
        if key == SOURCE_KEY:
            raise ValueError(f"`{SOURCE_KEY}` is always the image's own path; it cannot be set")
    if not id_prefix and not extras:
        return list(files)
    return [TaggedImage(id_prefix + f.id, f.path, f.label, getattr(f, "extra", ()) + extras) for f in files]


def parse_meta(texts: Sequence[str]) -> dict[str, str]:
    """`--meta KEY=VALUE` arguments as a dict, a later KEY winning; ValueError naming a bad one."""
    found: dict[str, str] = {}
    for text in texts:
        key, equals, value = text.partition("=")
        if not equals:
            raise ValueError(f"--meta {text!r}: expected KEY=VALUE")
        if not key:
            raise ValueError(f"--meta {text!r}: the key before '=' is empty")
        if key == SOURCE_KEY:
            raise ValueError(
                f"--meta {text!r}: `{SOURCE_KEY}` is always the image's own path (reindex reads the image "
                "again from it); choose another key"
            )
        found[key] = value
    return found


def collect_images(paths: Sequence[str | Path]) -> tuple[list[ImageFile], list[tuple[str, str]]]:
    """Returns the image files under the paths (folders recursively, sorted) and what was skipped, why.

    Every path here is absolute, as `ImageFile.path` (the `source` metadata) is and as the files the
    encoder refuses later are reported: one form in the summary however the folder was given."""
    found: dict[str, ImageFile] = {}
    skipped: list[tuple[str, str]] = []
    expected = f"not an image file name (expected one of {', '.join(sorted(IMAGE_SUFFIXES))})"
    for given in map(Path, paths):
        if given.is_dir():
            absolute = given.absolute()
            candidates = [(absolute, item_id) for item_id in files_under(given)]
        elif given.is_file():
            candidates = [(given.parent.absolute(), given.name)]
        else:
            skipped.append((str(given.absolute()), "no such file or folder"))
            continue
        for absolute, item_id in candidates:
            if _suffix(item_id).lower() not in IMAGE_SUFFIXES:
                skipped.append((str(absolute / item_id), expected))
            elif item_id in found:
                skipped.append(
                    (str(absolute / item_id), f"id {item_id!r} already taken by {found[item_id].path}")
                )
            else:
                parent, _, _ = item_id.rpartition("/")
                label = parent.rpartition("/")[2] if parent else absolute.name
                found[item_id] = ImageFile(item_id, absolute / item_id, label)
    return list(found.values()), skipped


def stored_ids(index: IndexClient) -> set[str]:
    """Every id the index holds (a point-in-time scan, ids only): what `imgsearch index --resume` skips."""
    return {item_id for page in index.scan() for item_id in page.ids}


def files_under(folder: Path) -> list[str]:
    """The files under a folder, as '/'-joined paths relative to it, in the order and by the rules of
    `sorted(p for p in folder.rglob("*") if p.is_file())` (symlinked files in, symlinked folders not
    entered, unreadable folders passed over), ten times faster: no Path per entry, no stat per file."""
    found: list[str] = []
    pending = [""]
    while pending:
        prefix = pending.pop()
        try:
            with os.scandir(folder / prefix if prefix else folder) as listing:
                entries = list(listing)
        except PermissionError:
            continue
        for entry in entries:
            try:
                if entry.is_dir() and not entry.is_symlink():
                    pending.append(f"{prefix}{entry.name}/")
                elif entry.is_file():
                    found.append(prefix + entry.name)
            except OSError:
                pass
    found.sort(key=lambda relative: relative.split("/"))  # as Paths sort: part by part
    return found


def _suffix(name: str) -> str:
    """Path(name).suffix."""
    base = name.rpartition("/")[2]
    dot = base.rfind(".")
    return base[dot:] if 0 < dot < len(base) - 1 else ""


def read_images(
    files: Sequence[ImageFile], skipped: list[tuple[str, str]]
) -> tuple[list[ImageFile], list[bytes]]:
    """Returns the files that could be read and their bytes; adds the others to `skipped`."""
    kept, datas = [], []
    for image in files:
        try:
            datas.append(image.path.read_bytes())
            kept.append(image)
        except OSError as error:
            skipped.append((str(image.path), f"cannot read: {error.strerror or error}"))
    return kept, datas


def embed_images(
    encoder: EncoderClient,
    files: list[ImageFile],
    datas: list[bytes],
    skipped: list[tuple[str, str]],
    novelty: bool = True,
) -> tuple[list[ImageFile], Embedding | None]:
    """Embeds a batch (with each image's novelty unless `novelty` is False); an image the encoder refuses
    goes to `skipped` and the rest is sent again."""
    files, datas = list(files), list(datas)
    while files:
        try:
            return files, encoder.embed(datas, novelty=novelty)
        except BadImage as bad:
            skipped.append((str(files[bad.position].path), bad.details))
            del files[bad.position], datas[bad.position]
    return [], None


def _embed_batch(
    encoder: EncoderClient, files: list[ImageFile], datas: list[bytes]
) -> tuple[list[ImageFile], Embedding | None, list[tuple[str, str]]]:
    """embed_images with its own list of skipped files, so a retried batch reports them once."""
    skipped: list[tuple[str, str]] = []
    kept, embedding = embed_images(encoder, files, datas, skipped)
    return kept, embedding, skipped


def batches(items: Sequence[ImageFile], size: int) -> list[Sequence[ImageFile]]:
    return [items[start : start + size] for start in range(0, len(items), size)]


def patiently(call: Callable[[], T], patience_s: float, on_wait: Callable[[str], None] | None = None) -> T:
    """Returns call(), retried with backoff while the service is unreachable, for up to patience_s.

    Only for idempotent calls (embedding, upserting by id): a call that reached the service before
    it went away may have been applied, and running it again must change nothing."""
    deadline = time.monotonic() + patience_s
    pause = 0.2
    while True:
        try:
            return call()
        except ServiceError as error:
            if error.code != grpc.StatusCode.UNAVAILABLE or time.monotonic() + pause > deadline:
                raise
            if on_wait is not None:
                on_wait(f"{error}; retrying for up to {deadline - time.monotonic():.0f} s")
            time.sleep(pause)
            pause = min(pause * 2, 2.0)


_Embedded = tuple[list[ImageFile], Embedding | None, list[tuple[str, str]], list[Collision]]
# kept, vectors, skipped, the stored items of those ids whose source is another file


def _read_and_embed(
    encoder: EncoderClient,
    batch: Sequence[ImageFile],
    patience_s: float,
    on_wait: Callable[[str], None] | None,
    index: IndexClient | None = None,
) -> _Embedded:
    """Reads a batch's files and embeds them (patiently); returns what embed_images does, every file
    skipped on the way (unreadable, then refused by the encoder), in that order, and, when `index` is
    given, the stored items the batch will replace whose `source` is another file (one Get of the
    batch's ids, no vectors)."""
    skipped: list[tuple[str, str]] = []
    readable, datas = read_images(batch, skipped)
    kept, embedding, bad = patiently(partial(_embed_batch, encoder, readable, datas), patience_s, on_wait)
    collisions = _collisions(index, kept, patience_s, on_wait) if index is not None and kept else []
    return kept, embedding, skipped + bad, collisions


def _collisions(
    index: IndexClient,
    files: Sequence[ImageFile],
    patience_s: float,
    on_wait: Callable[[str], None] | None,
) -> list[Collision]:
    """The stored items of the files' ids whose `source` is not the one each file stores, in file order.

    Asked before the batch's upsert: an ingest's ids are unique, so no earlier batch of it stored these,
    and the batches read ahead may ask while earlier ones are still being stored."""
    found, _ = patiently(partial(index.get, [f.id for f in files]), patience_s, on_wait)
    if not found:
        return []
    stored = {item.id: item.metadata.get(SOURCE_KEY, "") for item in found}
    collisions = []
    for image in files:
        if image.id in stored:
            source = image.metadata.get(SOURCE_KEY, "")  # what the upsert will store
            if stored[image.id] != source:
                collisions.append(Collision(image.id, stored[image.id], source))
    return collisions


def index_images(
    search: ImageSearch,
    files: Sequence[ImageFile],
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_batch: Callable[[int], None] | None = None,
    patience_s: float = DEFAULT_PATIENCE_S,
    on_wait: Callable[[str], None] | None = None,
    in_flight: int = DEFAULT_IN_FLIGHT,
    check_sources: bool = True,
) -> IngestReport:
    """Embeds and upserts the files in batches; returns what was indexed and what was skipped.

    A small bounded pipeline: up to `in_flight` batches are read and embedded ahead in threads, so the
    encoder has the next batch while the index stores the last and several encoder replicas work at
    once (round_robin sends each call to the next one; 0: one batch after the other); memory stays at
    about in_flight + 1 batches whatever the number of files; the
    upserts go one at a time in file order, so the report (skipped files, the count after the last
    upsert) is the same either way. A service that goes away mid-ingest (a restart, a replica
    removed) is waited for up to patience_s per call; upserts are by id, so a batch sent twice is
    stored once.

    With `check_sources`, each batch's ids are looked up (a Get, no vectors, beside the embedding)
    before it is stored, and the stored items it replaces whose `source` is another file are counted in
    the report (`replaced_other_source`) and the first few named (`collisions`): two folders with the
    same relative paths, indexed into one collection without --id-prefix, overwrite each other."""
    report = IngestReport()
    pending = deque(batches(files, batch_size))
    ahead: deque[tuple[int, Future[_Embedded]]] = deque()  # (batch size, its read-and-embed)
    pool = (
        ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix="imgsearch-embed")
        if in_flight > 0
        else None
    )
    index = search.index if check_sources else None

    def fill() -> None:
        while pool is not None and pending and len(ahead) < in_flight:
            batch = pending.popleft()
            future = pool.submit(_read_and_embed, search.encoder, batch, patience_s, on_wait, index)
            ahead.append((len(batch), future))

    try:
        while pending or ahead:
            fill()
            if ahead:
                size, future = ahead.popleft()
                kept, embedding, skipped, collisions = future.result()
                fill()  # the next batches embed while this one is upserted
            else:  # in_flight 0: one batch after the other
                batch = pending.popleft()
                size = len(batch)
                kept, embedding, skipped, collisions = _read_and_embed(
                    search.encoder, batch, patience_s, on_wait, index
                )
            report.skipped += skipped
            if embedding is not None:
                scores: list[float | None] = [*embedding.novelty] if embedding.novelty else [None] * len(kept)
                upsert = partial(
                    search.index.upsert,
                    [f.id for f in kept],
                    embedding.vectors,
                    [with_novelty(f.metadata, score) for f, score in zip(kept, scores, strict=True)],
                    embedding.model_version,
                    model_name=embedding.model,
                )
                report.count = patiently(upsert, patience_s, on_wait)
                report.indexed += len(kept)
                replica = embedding.replica or "?"
                report.by_replica[replica] = report.by_replica.get(replica, 0) + len(kept)
                if embedding.novelty is not None:
                    report.scored += len(kept)
                    report.novel += sum(score > NOVEL_ABOVE for score in embedding.novelty)
                report.replaced_other_source += len(collisions)
                report.collisions += collisions[: COLLISIONS_NAMED - len(report.collisions)]
            if on_batch is not None:
                on_batch(size)
    finally:
        if pool is not None:
            # On an error or Ctrl-C, batches not yet started are dropped; those under way end with their call.
            pool.shutdown(wait=False, cancel_futures=True)
    if not files:
        report.count = search.index.stats().count
    return report


@dataclass
class EmbeddedFiles:
    """What `embed_all` made of image files."""

    files: list[ImageFile]  # those embedded, in order
    vectors: np.ndarray  # float32 [len(files), dim]; [0, 0] when none
    model_version: str
    skipped: list[tuple[str, str]]  # (absolute path, why)
    novelty: list[float | None]  # one per file embedded: None where the encoder gave none
    model: str = ""  # the name of the model that embedded them


def embed_all(
    encoder: EncoderClient,
    files: Sequence[ImageFile],
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_batch: Callable[[int], None] | None = None,
    novelty: bool = True,
) -> EmbeddedFiles:
    """The files embedded in batches, with each one's novelty where the encoder gives it (`novelty`
    False: none asked for, a third less of the encoder's time)."""
    skipped: list[tuple[str, str]] = []
    kept_all: list[ImageFile] = []
    parts: list[np.ndarray] = []
    scores: list[float | None] = []
    version = model = ""
    for batch in batches(files, batch_size):
        readable, datas = read_images(batch, skipped)
        kept, embedding = embed_images(encoder, readable, datas, skipped, novelty)
        if embedding is not None:
            kept_all += kept
            parts.append(embedding.vectors)
            scores += embedding.novelty if embedding.novelty is not None else [None] * len(kept)
            version, model = embedding.model_version, embedding.model
        if on_batch is not None:
            on_batch(len(batch))
    vectors = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
    return EmbeddedFiles(kept_all, vectors, version, skipped, scores, model)


def embed_files(
    encoder: EncoderClient,
    files: Sequence[ImageFile],
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[list[ImageFile], np.ndarray, str, list[tuple[str, str]]]:
    """Returns (the files embedded, their vectors, the model version, the files skipped with why); no
    novelty asked for (embed_all gives it)."""
    done = embed_all(encoder, files, batch_size, on_batch, novelty=False)
    return done.files, done.vectors, done.model_version, done.skipped

"""Finding image files, and indexing them in batches through both services."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imgsearch.client import BadImage, Embedding, EncoderClient, ImageSearch

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
DEFAULT_BATCH_SIZE = 256


@dataclass(frozen=True)
class ImageFile:
    id: str  # the path relative to the folder given, or the file name for a file given directly
    path: Path
    label: str  # the parent folder's name

    @property
    def metadata(self) -> dict[str, str]:
        return {"label": self.label, "source": str(self.path)}


@dataclass
class IngestReport:
    indexed: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    count: int = 0  # items in the index afterwards


def collect_images(paths: Sequence[str | Path]) -> tuple[list[ImageFile], list[tuple[str, str]]]:
    """Returns the image files under the paths (folders recursively, sorted) and what was skipped, why."""
    found: dict[str, ImageFile] = {}
    skipped: list[tuple[str, str]] = []
    for given in map(Path, paths):
        if given.is_dir():
            candidates = [
                (p, p.relative_to(given).as_posix()) for p in sorted(given.rglob("*")) if p.is_file()
            ]
        elif given.is_file():
            candidates = [(given, given.name)]
        else:
            skipped.append((str(given), "no such file or folder"))
            continue
        for path, item_id in candidates:
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                skipped.append(
                    (
                        str(path),
                        f"not an image file name (expected one of {', '.join(sorted(IMAGE_SUFFIXES))})",
                    )
                )
            elif item_id in found:
                skipped.append((str(path), f"id {item_id!r} already taken by {found[item_id].path}"))
            else:
                found[item_id] = ImageFile(item_id, path.absolute(), path.absolute().parent.name)
    return list(found.values()), skipped


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
    encoder: EncoderClient, files: list[ImageFile], datas: list[bytes], skipped: list[tuple[str, str]]
) -> tuple[list[ImageFile], Embedding | None]:
    """Embeds a batch; an image the encoder refuses goes to `skipped` and the rest is sent again."""
    files, datas = list(files), list(datas)
    while files:
        try:
            return files, encoder.embed(datas)
        except BadImage as bad:
            skipped.append((str(files[bad.position].path), bad.details))
            del files[bad.position], datas[bad.position]
    return [], None


def batches(items: Sequence[ImageFile], size: int) -> list[Sequence[ImageFile]]:
    return [items[start : start + size] for start in range(0, len(items), size)]


def index_images(
    search: ImageSearch,
    files: Sequence[ImageFile],
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_batch: Callable[[int], None] | None = None,
) -> IngestReport:
    """Embeds and upserts the files in batches; returns what was indexed and what was skipped."""
    report = IngestReport()
    for batch in batches(files, batch_size):
        readable, datas = read_images(batch, report.skipped)
        kept, embedding = embed_images(search.encoder, readable, datas, report.skipped)
        if embedding is not None:
            report.count = search.index.upsert(
                [f.id for f in kept], embedding.vectors, [f.metadata for f in kept], embedding.model_version
            )
            report.indexed += len(kept)
        if on_batch is not None:
            on_batch(len(batch))
    if not files:
        report.count = search.index.stats().count
    return report


def embed_files(
    encoder: EncoderClient,
    files: Sequence[ImageFile],
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[list[ImageFile], np.ndarray, str, list[tuple[str, str]]]:
    """Returns (the files embedded, their vectors, the model version, the files skipped with why)."""
    skipped: list[tuple[str, str]] = []
    kept_all: list[ImageFile] = []
    parts: list[np.ndarray] = []
    version = ""
    for batch in batches(files, batch_size):
        readable, datas = read_images(batch, skipped)
        kept, embedding = embed_images(encoder, readable, datas, skipped)
        if embedding is not None:
            kept_all += kept
            parts.append(embedding.vectors)
            version = embedding.model_version
        if on_batch is not None:
            on_batch(len(batch))
    vectors = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
    return kept_all, vectors, version, skipped

"""The searches' metadata filter, as the API takes it, and the labels a collection holds, for the page's
label picker.

The filter: `label` (repeatable) keeps the items whose metadata `label` is any of the values (one any_of
condition); `filter` (repeatable) is the CLI's `--filter` syntax (KEY=VALUE, KEY!=VALUE, KEY^=PREFIX; the
same key twice means any of its values), read by imgsearch.filters.parse_filters. Everything is ANDed. The
index checks the conditions themselves (their number, their keys' and values' sizes) and names a bad one.

The labels: the distinct `label` values among the first SAMPLE_ITEMS items of the collection (one Scan,
cut short there), the SHOWN_LABELS most frequent of them, kept per collection for LABELS_TTL_S. A page
load asks for them; on a collection of a million items that is a scan of its first 10,000 once a minute
at most, not of all of it on every load. The sample is a guide, not a census (the reply says whether it
covered the whole collection): a label it missed can still be typed on the page, and filters as well."""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from fastapi import HTTPException

from imgsearch.client import IndexClient
from imgsearch.filters import Condition, parse_filters

LABEL_KEY = "label"
SAMPLE_ITEMS = 10_000  # items read for the labels, at most
SHOWN_LABELS = 100  # labels listed, at most: the most frequent in the sample
LABELS_TTL_S = 60.0  # how long a collection's labels are kept
CACHED_COLLECTIONS = 64  # collections whose labels are kept at once; the oldest goes first
_DIGITS = re.compile(r"(\d+)")


def search_filter(labels: Iterable[str] | None, filters: Iterable[str] | None) -> list[Condition]:
    """The conditions of a search's `label` and `filter` parameters (empty values ignored: a form's empty
    field); 400 naming a `filter` that cannot be read."""
    wanted = tuple(dict.fromkeys(label for label in labels or () if label))
    conditions = [Condition(LABEL_KEY, "any_of", wanted)] if wanted else []
    try:
        conditions += parse_filters(text for text in filters or () if text)
    except ValueError as error:
        raise HTTPException(400, str(error).removeprefix("--")) from None  # "filter 'x': expected ..."
    return conditions


def natural_key(text: str) -> tuple[tuple[int, int, str], ...]:
    """Sorts "2" before "10": runs of digits by their number, the rest as text."""
    return tuple(
        (1, int(part), part) if n % 2 else (0, 0, part) for n, part in enumerate(_DIGITS.split(text))
    )


@dataclass(frozen=True)
class LabelSample:
    """The labels found in the first `sampled` of `total` items of a collection."""

    labels: list[str]  # the most frequent, at most SHOWN_LABELS, in natural order
    distinct: int  # distinct labels in the sample; more than len(labels) when some were left out
    sampled: int
    total: int  # the collection's items when the scan began

    @property
    def complete(self) -> bool:
        return self.sampled >= self.total


def sample_labels(
    index: IndexClient, collection: str, items: int = SAMPLE_ITEMS, shown: int = SHOWN_LABELS
) -> LabelSample:
    """The labels of the collection's first `items` items: one Scan (pages as the index chooses them), left
    as soon as it has read that many."""
    counts: Counter[str] = Counter()
    sampled, total = 0, 0
    for page in index.scan(collection=collection):
        total = page.total
        for metadata in page.metadata[: items - sampled]:
            label = metadata.get(LABEL_KEY)
            if label is not None:
                counts[label] += 1
        sampled += min(len(page.ids), items - sampled)
        if sampled >= items:
            break  # leaving the loop cancels the scan
    labels = sorted((label for label, _ in counts.most_common(shown)), key=natural_key)
    return LabelSample(labels, len(counts), sampled, total)


class LabelCache:
    """Each collection's LabelSample, by the collection's name (an alias resolved), for ttl_s; at most
    `collections` of them. One sample is taken at a time: requests that arrive meanwhile wait for it
    rather than scan again."""

    def __init__(
        self,
        ttl_s: float = LABELS_TTL_S,
        collections: int = CACHED_COLLECTIONS,
        sample: Callable[[IndexClient, str], LabelSample] = sample_labels,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s, self.collections, self._sample, self._clock = ttl_s, collections, sample, clock
        self._kept: dict[str, tuple[float, LabelSample]] = {}
        self._lock = threading.Lock()

    def labels(self, index: IndexClient, collection: str) -> LabelSample:
        with self._lock:
            kept = self._kept.get(collection)
            if kept is not None and self._clock() - kept[0] < self.ttl_s:
                return kept[1]
            found = self._sample(index, collection)
            self._kept.pop(collection, None)
            self._kept[collection] = (self._clock(), found)
            while len(self._kept) > self.collections:
                del self._kept[next(iter(self._kept))]
            return found

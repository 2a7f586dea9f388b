"""The "nothing close" notice: a search whose nearest result is farther than the model's duplicate distance
times a factor says so, since the query is likely unlike anything stored (a photo in a collection of
digits, a blank drawing).

Both numbers come from the model's card (its card.json, which the encoder serves in Info): the key
`duplicate_distance` (the distance below which two images are the same picture, as measured for that
model), and the key `nothing_close_factor`; a card without a factor gets DEFAULT_NOTHING_CLOSE_FACTOR. A
card without a duplicate distance (or with one that is not a positive number) gets no notice, and no error.

The "unlike the training data" notice: the encoder scores each embedded image's novelty (its
reconstruction error over the 99th percentile of held-out training images': encoder_service/novelty.py),
and `imgsearch index` stores it in each item's metadata under `novelty`; above 1, the image looks unlike
what the model was trained on (the card's `dataset` names that), and the page says so of the query and
marks such results.

The cards change only when the encoder restarts: one Info call gives every model's, kept for CARDS_TTL_S
(FAILED_TTL_S after a failed call, which gives no notice rather than failing the search)."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from imgsearch.client import EncoderClient, Match, ServiceError

DUPLICATE_KEY = "duplicate_distance"
FACTOR_KEY = "nothing_close_factor"
DEFAULT_NOTHING_CLOSE_FACTOR = 3.0  # when the card has a duplicate distance but no factor
CARDS_TTL_S = 60.0
FAILED_TTL_S = 10.0

log = logging.getLogger("web")


def card_number(card: dict[str, Any], key: str) -> float | None:
    """The card's value of the key when it is a finite number above 0, else None."""
    value = card.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) and number > 0 else None


@dataclass(frozen=True)
class Closeness:
    """What a model's card says of nearness: nothing is close past `duplicate_distance` × `factor`."""

    duplicate_distance: float
    factor: float

    @property
    def limit(self) -> float:
        return self.duplicate_distance * self.factor


def closeness_of(card: dict[str, Any] | None) -> Closeness | None:
    """The card's Closeness; None when it has no usable duplicate distance."""
    duplicate = card_number(card or {}, DUPLICATE_KEY)
    if duplicate is None:
        return None
    factor = card_number(card or {}, FACTOR_KEY)
    return Closeness(duplicate, DEFAULT_NOTHING_CLOSE_FACTOR if factor is None else factor)


def nothing_close(closeness: Closeness | None, results: Sequence[Match], filtered: bool) -> str | None:
    """The notice for these results, nearest first: None unless even the nearest is past the limit."""
    if closeness is None or not results or results[0].distance <= closeness.limit:
        return None
    among = " among the items that match the filter" if filtered else ""
    return (
        f"Nothing close: the nearest result{among} is at {results[0].distance:.3g}, past "
        f"{closeness.factor:g} x the model's duplicate distance {closeness.duplicate_distance:.3g}; "
        "the query may be unlike anything stored"
    )


NOVELTY_KEY = "novelty"  # the metadata key `imgsearch index` stores an item's novelty under
NOVEL_ABOVE = 1.0


def stored_novelty(metadata: dict[str, str]) -> float | None:
    """An item's novelty from its metadata; None when it has none, or one that is not a number 0 or more."""
    text = metadata.get(NOVELTY_KEY)
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def unlike_training(novelty: float | None, model: str, card: dict[str, Any] | None, what: str) -> str | None:
    """The notice for a query of this novelty (`what`: "The image"): None unless above NOVEL_ABOVE."""
    if novelty is None or not novelty > NOVEL_ABOVE:
        return None
    dataset = (card or {}).get("dataset")
    trained = f"; trained on {dataset}" if isinstance(dataset, str) and dataset else ""
    return (
        f"{what} looks unlike what the model {model or 'default'!r} was trained on (novelty {novelty:.1f}"
        f"{trained}): its results may mean little"
    )


def model_card(models: Sequence[dict[str, Any]], model: str) -> dict[str, Any] | None:
    """The card of the model of that name among Info's models; "" is the encoder's default model."""
    for entry in models:
        if (entry.get("name") == model) if model else entry.get("default"):
            card: dict[str, Any] = entry.get("card") or {}
            return card
    return None


class ModelCards:
    """The encoder's models, as Info lists them (with their cards), for ttl_s; one Info call at a time."""

    def __init__(
        self,
        ttl_s: float = CARDS_TTL_S,
        failed_ttl_s: float = FAILED_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s, self.failed_ttl_s, self._clock = ttl_s, failed_ttl_s, clock
        self._models: list[dict[str, Any]] = []
        self._until = -math.inf  # when the models kept go stale
        self._lock = threading.Lock()

    def card(self, encoder: EncoderClient, model: str) -> dict[str, Any] | None:
        """The card of the model ("" the default); None when the encoder serves no such model, or when
        its Info call failed (logged) and no cards were read before."""
        with self._lock:
            if self._clock() >= self._until:
                try:
                    self._models = list(encoder.info()["models"])
                    self._until = self._clock() + self.ttl_s
                except ServiceError as error:
                    kept = "those read before stay in use" if self._models else "no nothing-close notice"
                    log.warning("the encoder's model cards could not be read (%s): %s for now", error, kept)
                    self._until = self._clock() + self.failed_ttl_s
            return model_card(self._models, model)

    def closeness(self, encoder: EncoderClient, model: str) -> Closeness | None:
        return closeness_of(self.card(encoder, model))

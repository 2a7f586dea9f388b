"""Metadata filters: what a condition means, its checks, and the reference matcher.

A filter is a tuple of conditions, ANDed; each names a metadata key, an operator and values. The
meaning (index.proto, `Condition`): EQUALS and ANY_OF need the key with one of the values; NOT_EQUALS and
NONE_OF match items that lack the key or have another value; PREFIX needs the key with a value starting
with the prefix; EXISTS needs the key. `matches` says it in code for one item: Scan, the tests and every
backend agree with it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from index_service.store import (
    MAX_METADATA_KEY_BYTES,
    MAX_METADATA_VALUE_BYTES,
    Condition,
    Filter,
    InvalidArgument,
)

__all__ = ["Condition", "Filter", "check_filter", "check_max_distance", "condition_matches", "matches"]

EQUALS, NOT_EQUALS, ANY_OF, NONE_OF, PREFIX, EXISTS = (
    "equals",
    "not_equals",
    "any_of",
    "none_of",
    "prefix",
    "exists",
)
OPERATORS = (EQUALS, NOT_EQUALS, ANY_OF, NONE_OF, PREFIX, EXISTS)
ONE_VALUE = (EQUALS, NOT_EQUALS, PREFIX)
MAX_CONDITIONS = 16
MAX_VALUES = 1024


def check_filter(conditions: Sequence[Condition]) -> Filter:
    """The conditions as a Filter, or InvalidArgument naming the first that cannot be used."""
    if len(conditions) > MAX_CONDITIONS:
        raise InvalidArgument(
            f"the filter has {len(conditions)} conditions; at most {MAX_CONDITIONS} are allowed"
        )
    for position, condition in enumerate(conditions):
        where = f"filter condition {position} (key {condition.key!r})"
        if not 1 <= len(condition.key.encode("utf-8")) <= MAX_METADATA_KEY_BYTES:
            raise InvalidArgument(f"{where}: keys must be 1 to {MAX_METADATA_KEY_BYTES} bytes")
        if condition.op not in OPERATORS:
            raise InvalidArgument(f"{where}: no operator given (one of {', '.join(OPERATORS)})")
        count = len(condition.values)
        if condition.op in ONE_VALUE and count != 1:
            raise InvalidArgument(f"{where}: {condition.op} takes exactly one value, got {count}")
        if condition.op in (ANY_OF, NONE_OF) and not 1 <= count <= MAX_VALUES:
            raise InvalidArgument(f"{where}: {condition.op} takes 1 to {MAX_VALUES} values, got {count}")
        if condition.op == EXISTS and count:
            raise InvalidArgument(f"{where}: exists takes no values, got {count}")
        for value in condition.values:
            if len(value.encode("utf-8")) > MAX_METADATA_VALUE_BYTES:
                raise InvalidArgument(f"{where}: a value is over {MAX_METADATA_VALUE_BYTES} bytes")
    return tuple(conditions)


def condition_matches(condition: Condition, metadata: Mapping[str, str]) -> bool:
    value = metadata.get(condition.key)
    op = condition.op
    if op == EXISTS:
        return value is not None
    if op in (EQUALS, ANY_OF):
        return value is not None and value in condition.values
    if op in (NOT_EQUALS, NONE_OF):
        return value is None or value not in condition.values
    return value is not None and value.startswith(condition.values[0])  # PREFIX


def matches(conditions: Filter, metadata: Mapping[str, str]) -> bool:
    """Whether one item's metadata matches every condition: the reference every backend agrees with."""
    return all(condition_matches(condition, metadata) for condition in conditions)


def check_max_distance(max_distance: float | None) -> float | None:
    if max_distance is not None and not max_distance >= 0:  # NaN too
        raise InvalidArgument(f"max_distance must be 0 or more, got {max_distance}")
    return max_distance

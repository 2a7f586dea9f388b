"""Metadata filters on the client side: conditions, the CLI's `--filter` syntax, and the protobuf.

`--filter KEY=VALUE` keeps items whose KEY is VALUE; the same key given twice means any of the values;
`KEY!=VALUE` keeps items whose KEY is not VALUE (or that have no KEY); `KEY^=PREFIX` keeps items whose
KEY starts with PREFIX. Different keys are ANDed. The index's own checks (index.proto, `Condition`) name a
bad condition; these only parse."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from imgsearch.v1 import index_pb2

OPERATORS = {
    "equals": index_pb2.Condition.EQUALS,
    "not_equals": index_pb2.Condition.NOT_EQUALS,
    "any_of": index_pb2.Condition.ANY_OF,
    "none_of": index_pb2.Condition.NONE_OF,
    "prefix": index_pb2.Condition.PREFIX,
    "exists": index_pb2.Condition.EXISTS,
}


@dataclass(frozen=True)
class Condition:
    """One condition on a metadata key: op is equals, not_equals, any_of, none_of, prefix or exists."""

    key: str
    op: str
    values: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, object]:
        return {"key": self.key, "op": self.op, "values": list(self.values)}


def parse_filters(texts: Iterable[str]) -> list[Condition]:
    """The CLI's `--filter` arguments as conditions; ValueError naming one it cannot read."""
    equal: dict[str, list[str]] = {}
    unequal: dict[str, list[str]] = {}
    conditions: list[Condition] = []
    for text in texts:
        at = text.find("=")  # the first '=', and what stands before it, decide: a key holds no '='
        if at < 0:
            raise ValueError(f"--filter {text!r}: expected KEY=VALUE, KEY!=VALUE or KEY^=PREFIX")
        sign = text[at - 1 : at + 1] if at and text[at - 1] in "!^" else "="
        key, value = text[: at + 1 - len(sign)], text[at + 1 :]
        if not key:
            raise ValueError(f"--filter {text!r}: the key before {sign!r} is empty")
        if sign == "^=":
            conditions.append(Condition(key, "prefix", (value,)))
        else:
            (unequal if sign == "!=" else equal).setdefault(key, []).append(value)
    for key, values in equal.items():
        unique = tuple(dict.fromkeys(values))
        conditions.append(Condition(key, "equals" if len(unique) == 1 else "any_of", unique))
    for key, values in unequal.items():
        unique = tuple(dict.fromkeys(values))
        conditions.append(Condition(key, "not_equals" if len(unique) == 1 else "none_of", unique))
    return conditions


def filter_message(conditions: Sequence[Condition]) -> index_pb2.Filter:
    message = index_pb2.Filter()
    for condition in conditions:
        if condition.op not in OPERATORS:
            raise ValueError(f"unknown filter operator {condition.op!r} (one of {', '.join(OPERATORS)})")
        message.conditions.add(key=condition.key, op=OPERATORS[condition.op], values=list(condition.values))
    return message

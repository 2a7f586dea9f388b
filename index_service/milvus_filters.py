"""Metadata filters (filters.py) as Milvus filter expressions over a collection's JSON field: the `filter=`
of Milvus's search and query, meaning exactly what `filters.matches` does, on Milvus Lite and on a Milvus
2.3.5 server alike.

Each condition becomes one parenthesised term over `meta["KEY"]`, and the terms are ANDed:

    equals      (meta["k"] == "v")
    not_equals  ((not exists meta["k"]) or (meta["k"] != "v"))
    any_of      (meta["k"] in ["v1", "v2"])                         on a server
                ((meta["k"] == "v1") or (meta["k"] == "v2"))        on Milvus Lite, balanced
    none_of     ((not exists meta["k"]) or (not ANY_OF))
    prefix      ((meta["k"] >= "P") and (meta["k"] < "Q"))           Q: the least string after every P...
    exists      (exists meta["k"])

What the two engines do, found by trying them (tests/service/test_milvus_filters.py holds them to it):

- A key an item lacks. The server takes `!=`, `not (... == ...)` and `not in` to be true for it (our
  meaning); Milvus Lite evaluates with SQL's three-valued logic, so there the comparison is unknown and its
  negation too: the item is left out. Saying `(not exists K) or ...` gives our meaning on both (and costs
  the server nothing it did not do). `exists K` is true exactly when the item has the key, on both.
- Precedence. On the server `not exists K or X` parses as `not exists (K or X)` and is refused, hence the
  parentheses around every term.
- `in` over a JSON path: the server evaluates it (16 lists of 1,024 values over 3,000 rows: ~0.1 s); Milvus
  Lite refuses it ("left side of 'in' must be a field reference"), so there it is a balanced tree of `==`
  (depth log2 of the values; the server parses one as well, but slower than `in`).
- `like` cannot say a prefix exactly on either: Milvus Lite's `_` is a one-character wildcard and it has no
  escape for `%` or `_` (a backslash is a plain character); the server's `_` is literal, a backslash escapes
  a `%`, but a pattern ending in an escaped backslash matches nothing, and `like ""` matches every value.
  A prefix is therefore a range: strings that start with P are exactly those from P up to (not including)
  the least string greater than all of them, P with its last character incremented (a last character
  U+10FFFF dropped first; the surrogates, which no string holds, skipped), or everything from P when P is
  U+10FFFF repeated. Both engines compare strings by code point (the server's bytes of UTF-8 as unsigned
  characters, Milvus Lite's Python strings), the order `str.startswith` agrees with. The prefix "" is
  `exists`.
- String literals: double-quoted, with backslash, quote, newline, carriage return and tab escaped
  (`filter_literal`); every other character, unicode and control characters too, is itself on both. One
  exception: the server drops a key holding a NUL character when it is written raw (no item has the key
  then), and takes it when written `\\u0000`, which Milvus Lite refuses ("unknown escape sequence"), so NUL
  is written `\\u0000` for the server only.
- Milvus Lite (a Python engine) evaluates JSON paths row by row, about 5 microseconds a row per compared
  value: a filter of 1,024 values over 3,000 items takes ~4 s there; the server evaluates in C++.
"""

from __future__ import annotations

from index_service.filters import ANY_OF, EQUALS, EXISTS, NONE_OF, NOT_EQUALS, PREFIX, Condition, Filter

MAX_CODE_POINT = 0x10FFFF
SURROGATES = (0xD800, 0xDFFF)


def filter_literal(value: str, *, server: bool = False) -> str:
    """A string as a double-quoted Milvus filter literal (pymilvus's own `get(ids=...)` and
    `query_iterator` do not escape, so an id holding a quote would break them). `server`: NUL written
    `\\u0000`, as the Milvus server needs it in a JSON key (Milvus Lite refuses the escape, and takes NUL
    as it is)."""
    escaped = (
        value.replace("\\", "\\\\")
        .replace('"', '\\"')
        .replace("\n", "\\n")
        .replace("\r", "\\r")
        .replace("\t", "\\t")
    )
    if server:
        escaped = escaped.replace("\x00", "\\u0000")
    return f'"{escaped}"'


def prefix_bound(prefix: str) -> str | None:
    """The least string greater than every string that starts with `prefix` (not empty); None when there
    is none (the prefix is all U+10FFFF)."""
    chars = list(prefix)
    while chars:
        following = ord(chars.pop()) + 1
        if following <= MAX_CODE_POINT:
            if SURROGATES[0] <= following <= SURROGATES[1]:
                following = SURROGATES[1] + 1
            return "".join(chars) + chr(following)
    return None


def _balanced_or(terms: list[str]) -> str:
    if len(terms) == 1:
        return terms[0]
    middle = len(terms) // 2
    return f"({_balanced_or(terms[:middle])} or {_balanced_or(terms[middle:])})"


def condition_expression(condition: Condition, field: str, *, server: bool) -> str:
    """One condition as a parenthesised Milvus expression over the JSON field."""
    path = f"{field}[{filter_literal(condition.key, server=server)}]"

    def literal(value: str) -> str:
        return filter_literal(value, server=server)

    op = condition.op
    if op == EXISTS or (op == PREFIX and not condition.values[0]):
        return f"(exists {path})"
    if op == EQUALS:
        return f"({path} == {literal(condition.values[0])})"
    if op == NOT_EQUALS:
        return f"((not exists {path}) or ({path} != {literal(condition.values[0])}))"
    if op in (ANY_OF, NONE_OF):
        values = list(dict.fromkeys(condition.values))
        if server:
            any_of = f"({path} in [{', '.join(literal(v) for v in values)}])"
        else:
            any_of = _balanced_or([f"({path} == {literal(v)})" for v in values])
        return any_of if op == ANY_OF else f"((not exists {path}) or (not {any_of}))"
    if op == PREFIX:
        prefix = condition.values[0]
        bound = prefix_bound(prefix)
        if bound is None:
            return f"({path} >= {literal(prefix)})"
        return f"(({path} >= {literal(prefix)}) and ({path} < {literal(bound)}))"
    raise ValueError(f"unknown filter operator {op!r}")


def filter_expression(conditions: Filter, field: str, *, server: bool) -> str:
    """The conditions ANDed as one Milvus expression over the JSON field; "" for no conditions."""
    return " and ".join(condition_expression(c, field, server=server) for c in conditions)

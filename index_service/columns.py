"""Metadata columns of the FAISS store: one key's values by row, as int32 codes into the key's distinct
values (-1 where an item lacks the key), so a filter is a few numpy comparisons over all rows.

A column is made the first time a filter names its key (one pass over the stored metadata) and kept up to
date by every write after; at most MAX_COLUMNS are kept, the least recently used dropped first. Distinct
values stay in the table after their last row goes (a code no row holds matches nothing)."""

from __future__ import annotations

import numpy as np

from index_service.filters import ANY_OF, EQUALS, EXISTS, NONE_OF, NOT_EQUALS, Condition

MAX_COLUMNS = 32
ABSENT = -1


class Column:
    def __init__(self, values: list[str | None]) -> None:
        self.code_of: dict[str, int] = {}
        self.values: list[str] = []
        self._codes = np.empty(max(16, len(values)), np.int32)
        self.size = 0
        self._codes[: len(values)] = [self.code(value) for value in values]
        self.size = len(values)

    def code(self, value: str | None) -> int:
        if value is None:
            return ABSENT
        code = self.code_of.get(value)
        if code is None:
            code = self.code_of[value] = len(self.values)
            self.values.append(value)
        return code

    @property
    def codes(self) -> np.ndarray:
        return self._codes[: self.size]

    def append(self, values: list[str | None]) -> None:
        needed = self.size + len(values)
        if needed > len(self._codes):
            grown = np.empty(max(needed, 2 * len(self._codes)), np.int32)
            grown[: self.size] = self._codes[: self.size]
            self._codes = grown
        self._codes[self.size : needed] = [self.code(value) for value in values]
        self.size = needed

    def set(self, row: int, value: str | None) -> None:
        self._codes[row] = self.code(value)

    def move(self, source: int, target: int) -> None:
        self._codes[target] = self._codes[source]

    def truncate(self, size: int) -> None:
        self.size = size

    def mask(self, condition: Condition) -> np.ndarray:
        """The rows that match one condition, as booleans."""
        codes = self.codes
        op = condition.op
        if op == EXISTS:
            return codes != ABSENT
        if op in (EQUALS, NOT_EQUALS, ANY_OF, NONE_OF):
            wanted = [self.code_of[v] for v in condition.values if v in self.code_of]
        else:  # PREFIX: every distinct value that starts with it
            prefix = condition.values[0]
            wanted = [code for value, code in self.code_of.items() if value.startswith(prefix)]
        if not wanted:
            hit = np.zeros(len(codes), bool)
        elif len(wanted) == 1:
            hit = codes == wanted[0]
        else:
            hit = np.isin(codes, np.array(wanted, np.int32))
        return ~hit if op in (NOT_EQUALS, NONE_OF) else hit

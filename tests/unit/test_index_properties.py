"""Property test: random upserts, deletes, searches and restarts against a brute-force model."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from index_service.durable import DurableStore
from index_service.store import InvalidArgument

DIM = 4
IDS = st.sampled_from([f"id{n}" for n in range(12)] + ["ünï/côdé", "x" * 256])
# small integers: distances are exact in float32, so a tie is a real tie, not rounding
VECTOR = st.lists(st.integers(-4, 4), min_size=DIM, max_size=DIM)


class IndexMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.directory = Path(tempfile.mkdtemp(prefix="index-properties-"))
        self.durable = DurableStore(self.directory, snapshot_every_ops=7)
        self.model: dict[str, tuple[np.ndarray, dict[str, str]]] = {}

    def teardown(self) -> None:
        self.durable.close(snapshot=False)
        shutil.rmtree(self.directory, ignore_errors=True)

    @rule(
        items=st.dictionaries(
            IDS,
            st.tuples(
                VECTOR, st.dictionaries(st.text(min_size=1, max_size=5), st.text(max_size=5), max_size=2)
            ),
            min_size=1,
            max_size=4,
        )
    )
    def upsert(self, items: dict[str, tuple[list[int], dict[str, str]]]) -> None:
        ids = list(items)
        vectors = np.array([items[i][0] for i in ids], np.float32)
        self.durable.store.upsert(ids, vectors, [items[i][1] for i in ids], "m")
        for item_id, vector in zip(ids, vectors, strict=True):
            self.model[item_id] = (vector, items[item_id][1])

    @rule(ids=st.lists(IDS, min_size=1, max_size=4))
    def delete(self, ids: list[str]) -> None:
        deleted, missing = self.durable.store.delete(ids)
        unique = list(dict.fromkeys(ids))
        assert deleted == sum(i in self.model for i in unique) and deleted + missing == len(unique)
        for item_id in unique:
            self.model.pop(item_id, None)

    @rule(query=VECTOR, k=st.integers(1, 20))
    def search(self, query: list[int], k: int) -> None:
        (matches,) = self.durable.store.search(np.array([query], np.float32), k)
        # squared distances of integer vectors are exact integers: compare those
        truth = {i: int(((v - np.array(query)) ** 2).sum()) for i, (v, _) in self.model.items()}
        assert [round(m.distance**2) for m in matches] == sorted(truth.values())[:k]
        for match in matches:
            assert round(match.distance**2) == truth[match.id] and match.metadata == self.model[match.id][1]
            assert abs(match.distance - truth[match.id] ** 0.5) < 1e-5  # Euclidean, not squared

    @rule(item=IDS, k=st.integers(1, 5))
    def search_by_id(self, item: str, k: int) -> None:
        if item not in self.model:
            return
        (matches,) = self.durable.store.search_by_id([item], k)
        assert item not in [m.id for m in matches] and len(matches) == min(k, len(self.model) - 1)

    @rule(snapshot=st.booleans())
    def restart(self, snapshot: bool) -> None:
        """A graceful stop (snapshot) or a crash (none): either way everything comes back."""
        self.durable.close(snapshot=snapshot)
        self.durable = DurableStore(self.directory, snapshot_every_ops=7)

    @rule()
    def bad_batch_changes_nothing(self) -> None:
        try:
            self.durable.store.upsert(["ok", "ok"], np.zeros((2, DIM), np.float32), (), "m")
        except InvalidArgument:
            return
        raise AssertionError("duplicate ids in one batch were accepted")

    @invariant()
    def holds_the_model(self) -> None:
        state = self.durable.store.state()
        assert sorted(state.ids) == sorted(self.model)
        for item_id, entries, vector in zip(state.ids, state.metadata, state.vectors, strict=True):
            assert np.array_equal(vector, self.model[item_id][0]) and entries == self.model[item_id][1]


IndexMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=30, deadline=None, derandomize=True
)
test_index_against_a_model = IndexMachine.TestCase

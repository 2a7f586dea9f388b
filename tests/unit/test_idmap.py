"""PackedIds and RowMap (index_service/idmap.py) against a list and a dict, the structures they replace."""

from __future__ import annotations

import random
from array import array
from collections.abc import Callable

import numpy as np
import pytest

from index_service.idmap import TAKE_ONE_BY_ONE, PackedIds, RowMap, fill_from_tail
from index_service.store import MAX_ID_BYTES

# Ids of every awkward shape: 1 byte, MAX_ID_BYTES bytes (ASCII, 2-, 3- and 4-byte characters), prefixes
# of each other, ids differing only in their last character, and plain ones.
AWKWARD = [
    "a",
    "ab",
    "abc",
    "abcd",
    "é",
    "日",
    "😀",
    "x" * MAX_ID_BYTES,
    "x" * (MAX_ID_BYTES - 1),
    "é" * (MAX_ID_BYTES // 2),
    "😀" * (MAX_ID_BYTES // 4),
    "日本" * 42 + "a" + "日",
    "img-0000001",
    "img-0000002",
    "img-000000",
    "Img-0000001",
    " ",
    "\x00",
]

HASHES: dict[str, Callable[[str], int]] = {
    "builtin": hash,
    # one tag for all: every probe meets equal tags, so keys are told apart by their bytes alone
    "constant": lambda key: 7,
    # few distinct tags, many equal ones (long chains of equal tags, different keys)
    "few": lambda key: len(key.encode()) % 5,
    # the same home slot for every key below 2**16 slots, but different tags
    "same-home": lambda key: hash(key) & ~0xFFFF,
    # negative and past 32 bits: only the low 32 bits count
    "negative": lambda key: -(hash(key) % 1000) - (1 << 40),
}


def make_id(rnd: random.Random) -> str:
    choice = rnd.random()
    if choice < 0.3:
        return rnd.choice(AWKWARD)
    if choice < 0.5:
        return "p" * rnd.randint(1, 12)  # prefixes of each other
    if choice < 0.6:
        return "".join(rnd.choice("aé日😀") for _ in range(rnd.randint(1, 6)))
    return f"img-{rnd.randrange(600):07d}"


class Model:
    """PackedIds + RowMap changed as VectorStore changes its `_ids` and `_row_of`, next to a list and a
    dict changed the same way."""

    def __init__(self, hash_fn: Callable[[str], int], capacity: int = 8) -> None:
        self.ids = PackedIds()
        self.rows = RowMap(self.ids, capacity=capacity, hash_fn=hash_fn)
        self.list: list[str] = []
        self.dict: dict[str, int] = {}
        self.compactions = 0

    def add(self, item_id: str) -> None:
        if item_id in self.dict:
            row = self.dict[item_id]
            assert self.rows.get(item_id) == row
            self.rows[item_id] = row  # a replacement keeps its row
            return
        self.dict[item_id] = len(self.list)
        self.list.append(item_id)
        self.rows[item_id] = len(self.ids)  # as VectorStore._apply: the map first, then the id
        self.ids.append(item_id)

    def add_batch(self, batch: list[str]) -> None:
        new = list(dict.fromkeys(i for i in batch if i not in self.dict))
        if not new:
            return
        first = len(self.list)
        self.dict.update((item_id, first + n) for n, item_id in enumerate(new))
        self.list.extend(new)
        self.ids.extend(new)
        self.rows.extend(new, first)

    def remove(self, victims: list[str], use_move: bool) -> None:
        """VectorStore._remove: pop every id from the map, then fill each row from the last one."""
        victims = list(dict.fromkeys(v for v in victims if v in self.dict))
        rows = sorted((self.rows.pop(v) for v in victims), reverse=True)
        assert rows == sorted((self.dict.pop(v) for v in victims), reverse=True)
        last = len(self.ids) - 1
        for row in rows:
            if row != last:
                moved = self.ids[last]
                assert moved == self.list[last]
                if use_move:
                    self.ids.move(last, row)
                else:
                    self.ids[row] = moved
                self.rows[moved] = row
                self.list[row] = moved
                self.dict[moved] = row
            used = self.ids._used
            assert self.ids.pop() == self.list.pop()
            if self.ids._used < used:
                self.compactions += 1
            last -= 1

    def remove_bulk(self, victims: list[str]) -> None:
        """The same, in bulk: RowMap.pop_many, PackedIds.remove_rows, RowMap.remap; the list and the dict
        still change one row at a time, so the layouts must agree exactly."""
        victims = list(dict.fromkeys(v for v in victims if v in self.dict))
        rows = self.rows.pop_many(victims)
        assert rows.tolist() == [self.dict[v] for v in victims]
        sources, targets = self.ids.remove_rows(rows)
        self.rows.remap(sources, targets)
        last = len(self.list) - 1
        for row in sorted((self.dict.pop(v) for v in victims), reverse=True):
            if row != last:
                self.list[row] = self.list[last]
                self.dict[self.list[row]] = row
            self.list.pop()
            last -= 1

    def pop_last(self) -> None:
        item_id = self.list.pop()
        del self.dict[item_id]
        assert self.rows.pop(item_id) == len(self.list)  # the map first: it reads the id of the row
        assert self.ids.pop() == item_id

    def check_lookups(self, keys: list[str]) -> None:
        for key in keys:
            expected = self.dict.get(key)
            assert self.rows.get(key) == expected, key
            assert self.rows.get(key, -5) == (expected if expected is not None else -5)
            assert (key in self.rows) == (expected is not None)
            if expected is None:
                with pytest.raises(KeyError):
                    self.rows[key]
            else:
                assert self.rows[key] == expected
        assert self.rows.rows_of(keys) == [self.dict.get(k) for k in keys]

    def check_all(self, rnd: random.Random) -> None:
        assert len(self.ids) == len(self.list) and len(self.rows) == len(self.dict)
        assert bool(self.ids) == bool(self.list)
        assert self.ids.id_bytes == sum(len(i.encode()) for i in self.list)
        if self.list:
            row = rnd.randrange(-len(self.list), len(self.list))
            assert self.ids.byte_size(row) == len(self.list[row].encode())
        assert self.ids.tolist() == self.list
        assert list(self.ids) == self.list
        for row in rnd.sample(range(len(self.list)), min(20, len(self.list))):
            assert self.ids[row] == self.list[row]
        if self.list:
            assert self.ids[-1] == self.list[-1]
        copied = self.ids.copy()
        assert copied.tolist() == self.list and copied.id_bytes == self.ids.id_bytes
        start, stop = sorted(rnd.randrange(-len(self.list) - 2, len(self.list) + 3) for _ in range(2))
        assert copied[start:stop] == self.list[start:stop] and copied[::3] == self.list[::3]
        copied.append("only-in-the-copy")
        assert len(self.ids) == len(self.list)
        self.check_lookups(list(self.dict))
        rows = np.array([rnd.randrange(len(self.list)) for _ in range(30)] if self.list else [], np.int64)
        assert self.ids.take(rows) == [self.list[r] for r in rows.tolist()]
        blob, ends = self.ids.blob_of(rows)
        assert ends.dtype == np.uint32
        assert blob == "".join(self.list[r] for r in rows.tolist()).encode()
        assert np.array_equal(ends, np.cumsum([len(self.list[r].encode()) for r in rows.tolist()]))


@pytest.mark.parametrize("hash_name", list(HASHES))
@pytest.mark.parametrize("seed", [1, 2])
def test_matches_a_list_and_a_dict(hash_name: str, seed: int) -> None:
    rnd = random.Random(seed)
    model = Model(HASHES[hash_name])
    capacities = set()
    steps = 3000 if hash_name in ("builtin", "negative") else 600  # the others make chains of O(n)
    for step in range(steps):
        choice = rnd.random()
        if choice < 0.4:
            model.add(make_id(rnd))
        elif choice < 0.47:
            model.add_batch([make_id(rnd) for _ in range(rnd.randint(1, 40))])
        elif choice < 0.7 and model.list:
            count = rnd.choice([1, 1, 2, 5, 20])
            model.remove([rnd.choice(model.list) for _ in range(count)], use_move=rnd.random() < 0.5)
        elif choice < 0.75 and model.list:
            count = rnd.choice([1, 5, 20, len(model.list) // 3])  # small ones pop one by one, large rebuild
            model.remove_bulk([rnd.choice(model.list) for _ in range(count)])
        elif choice < 0.8 and model.list:
            model.pop_last()
        else:
            model.check_lookups([make_id(rnd) for _ in range(5)] + [make_id(rnd) + "?"])
        capacities.add(len(model.rows._rows))
        if step % 100 == 0:
            model.check_all(rnd)
    model.check_all(rnd)
    assert len(capacities) >= 4, capacities  # the table grew past several sizes
    assert model.compactions, "no compaction happened"


def test_growth_then_emptying_and_refilling() -> None:
    rnd = random.Random(5)
    model = Model(hash, capacity=8)
    for n in range(3000):
        model.add(f"id-{n}-" + "é" * (n % 7))
    model.check_all(rnd)
    buffer_bytes, slots = len(model.ids._buf), len(model.rows._rows)
    model.remove(list(model.list), use_move=False)
    model.check_all(rnd)
    assert len(model.rows._rows) < slots / 100  # the table shrank as it emptied
    assert len(model.ids._buf) < buffer_bytes  # compacted down once the garbage outweighed the rest
    assert len(model.ids._start) < 3000  # the row arrays shrank too
    model.add_batch([f"again-{n}" for n in range(500)])
    model.check_all(rnd)


def test_backward_shift_deletion_keeps_the_later_ids_of_a_probe_chain() -> None:
    """Deleting an id from the middle of a chain must not cut the chain: the ids after it, of the same
    home slot or of later ones (a chain wrapping round the table's end), must still be found. Clearing
    the slot alone, the classic open-addressing bug, loses some: checked on a copy each time, so this
    test is known to catch that bug."""
    homes = {"a": 13, "b": 13, "c": 13, "d": 14, "e": 13, "f": 0, "g": 2}
    ids = PackedIds(homes)
    rows = RowMap(ids, capacity=16, hash_fn=homes.__getitem__)
    for row, key in enumerate(homes):
        rows[key] = row
    # a@13 b@14 c@15 d@0 e@1 f@2 g@3: one chain from 13, wrapped round the end
    assert [rows._slot(k, homes[k]) for k in homes] == [13, 14, 15, 0, 1, 2, 3]
    held = dict(zip(homes, range(len(homes)), strict=True))
    for victim in ["b", "a", "d"]:
        naive = RowMap(ids, capacity=16, hash_fn=homes.__getitem__)
        naive._rows, naive._tags, naive._count = array("i", rows._rows), array("I", rows._tags), len(rows)
        naive._rows[rows._slot(victim, homes[victim])] = -1  # a deletion without the shift
        assert any(naive.get(k) is None for k in held if k != victim)

        assert rows.pop(victim) == held.pop(victim)
        assert victim not in rows and rows.get(victim) is None
        assert {k: rows.get(k) for k in homes} == {k: held.get(k) for k in homes}
    assert [rows.get(k) for k in homes] == [None, None, 2, None, 4, 5, 6]
    assert len(rows) == 4
    with pytest.raises(KeyError):
        rows.pop("a")


def test_deletion_leaves_an_entry_whose_home_is_after_the_gap() -> None:
    homes = {"a": 0, "b": 1, "c": 1, "d": 3}
    ids = PackedIds(homes)
    rows = RowMap(ids, capacity=8, hash_fn=lambda key: homes[key])
    rows.extend(list(homes), 0)  # a@0 b@1 c@2 d@3
    rows.pop("a")
    assert rows._slot("b", 1) == 1 and rows._slot("c", 1) == 2 and rows._slot("d", 3) == 3
    rows.pop("b")  # c moves back to its home; d stays at its own
    assert rows._slot("c", 1) == 1 and rows._slot("d", 3) == 3
    assert [rows.get(k) for k in homes] == [None, None, 2, 3]


@pytest.mark.parametrize("hash_name", ["builtin", "constant", "few"])
def test_extend_refuses_ids_held_or_given_twice_and_changes_nothing(hash_name: str) -> None:
    ids = PackedIds([f"k{n}" for n in range(200)])
    rows = RowMap(ids, hash_fn=HASHES[hash_name])
    rows.extend(ids.tolist(), 0)

    def table() -> tuple[bytes, bytes, int]:
        table_rows, table_tags = np.array(rows._rows), np.array(rows._tags)
        return table_rows.tobytes(), table_tags[table_rows >= 0].tobytes(), len(rows)

    before = table()
    cases = [
        ["new-1", "new-2", "new-1"],  # twice in the batch, small batch: probed in rounds
        ["new-1", "k7"],  # held already
        [f"n{n}" for n in range(100)] + ["k3"],  # held already, large batch: the table rebuilt
        [f"n{n}" for n in range(100)] + ["n5"],  # twice, large batch
    ]
    for batch in cases:
        with pytest.raises(ValueError, match="held already or given twice"):
            rows.extend(batch, len(ids))
        assert table() == before
    assert rows.rows_of(["k0", "k199", "new-1", "n5"]) == [0, 199, None, None]


def test_large_batches_grow_the_table_and_lookups_in_bulk() -> None:
    keys = [f"img-{n:07d}" for n in range(20_000)]
    ids = PackedIds(keys[:5000])
    rows = RowMap(ids)
    rows.extend(keys[:5000], 0)
    ids.extend(keys[5000:5500])
    rows.extend(keys[5000:5500], 5000)  # small: in rounds
    ids.extend(keys[5500:])
    rows.extend(keys[5500:], 5500)  # large: rebuilt
    assert len(rows) == 20_000 and len(rows._rows) * 0.7 >= 20_000
    asked = [*keys[::7], "img-9999999", "img-000000", "", "\udc80"]
    expected = [n * 7 for n in range(len(keys[::7]))] + [-1] * 4
    assert rows.rows_array(asked).tolist() == expected
    assert rows.get("\udc80") is None and "\udc80" not in rows
    assert RowMap(PackedIds()).rows_array(["a"]).tolist() == [-1]
    assert rows.rows_array([]).tolist() == []


def test_packed_ids_like_a_list() -> None:
    ids = PackedIds(["a", "bb"])
    assert len(ids) == 2 and ids[0] == "a" and ids[-1] == "bb" and ids[-2] == "a"
    for bad in (2, -3):
        with pytest.raises(IndexError):
            ids[bad]
    with pytest.raises(IndexError):
        ids[2] = "c"
    with pytest.raises(IndexError):
        ids.move(0, 2)
    for too_long in ("", "x" * (MAX_ID_BYTES + 1), "é" * (MAX_ID_BYTES // 2) + "x"):
        with pytest.raises(ValueError):
            ids.append(too_long)
        with pytest.raises(ValueError):
            ids.extend(["fine", too_long])
        with pytest.raises(ValueError):
            ids[0] = too_long
    assert ids.tolist() == ["a", "bb"]
    ids[0] = "cc"  # as long as the last row's id, but not it: written anew
    assert ids.tolist() == ["cc", "bb"]
    ids[0] = "ccc"
    ids[1] = "ccc"
    assert ids.tolist() == ["ccc", "ccc"]
    assert ids.pop() == "ccc" and ids.pop() == "ccc"
    with pytest.raises(IndexError):
        ids.pop()
    assert ids.tolist() == [] and ids.take(np.zeros(0, np.int64)) == []
    blob, ends = ids.blob_of([])
    assert blob == b"" and ends.dtype == np.uint32 and ends.size == 0
    assert ids.nbytes > 0


def test_take_and_blob_of_round_trip() -> None:
    rnd = random.Random(3)
    keys = [make_id(rnd)[:20] + str(n) for n in range(3000)] + AWKWARD
    ids = PackedIds()
    for key in keys[:100]:
        ids.append(key)
    ids.extend(keys[100:])
    rows = np.array([rnd.randrange(len(keys)) for _ in range(100_000)] + [-1, -len(keys)], np.int64)
    expected = [keys[r] for r in rows.tolist()]
    assert ids.take(rows) == expected
    blob, ends = ids.blob_of(rows)  # more rows than one chunk of the gather
    starts = np.concatenate(([0], ends[:-1])).tolist()
    assert [blob[a:b].decode() for a, b in zip(starts, ends.tolist(), strict=True)] == expected
    ascii_only = [k for k in keys if k.isascii()]
    assert PackedIds(ascii_only).take(list(range(len(ascii_only)))) == ascii_only
    with pytest.raises(IndexError):
        ids.take([len(keys)])


def test_moves_share_bytes_and_compaction_reclaims_them() -> None:
    ids = PackedIds(f"id-{n:05d}" for n in range(1000))
    used = ids._used
    ids[3] = ids[-1]  # the last row's id: shared, nothing written
    ids.move(999, 4)
    assert ids._used == used and ids[3] == ids[4] == "id-00999"
    ids.pop()
    assert ids[3] == ids[4] == "id-00999"
    for row in range(990):  # overwrite with fresh ids until the garbage outweighs the rest
        ids[row] = f"new-{row:05d}"
    assert ids._used <= 2 * ids._live + 256
    assert ids.tolist() == [f"new-{n:05d}" for n in range(990)] + [f"id-{n:05d}" for n in range(990, 999)]


def test_fill_from_tail_makes_the_moves_of_one_by_one_deletion() -> None:
    rnd = random.Random(9)
    for _ in range(300):
        count = rnd.randint(0, 60)
        gone = rnd.sample(range(count), rnd.randint(0, count))
        layout = list(range(count))  # which original row each row holds, deleting one by one
        last = count - 1
        for row in sorted(gone, reverse=True):
            if row != last:
                layout[row] = layout[last]
            layout.pop()
            last -= 1
        sources, targets = fill_from_tail(count, np.array(gone, np.int64))
        moved = list(range(count))
        for source, target in zip(sources.tolist(), targets.tolist(), strict=True):
            moved[target] = source
        assert moved[: count - len(gone)] == layout
    with pytest.raises(ValueError):
        fill_from_tail(5, [1, 1])
    with pytest.raises(IndexError):
        fill_from_tail(5, [5])


def test_bulk_removal_refuses_missing_or_repeated_keys_and_changes_nothing() -> None:
    keys = [f"k{n}" for n in range(100)]
    ids = PackedIds(keys)
    rows = RowMap(ids)
    rows.extend(keys, 0)
    with pytest.raises(KeyError):
        rows.pop_many(["k1", "nope"])
    with pytest.raises(ValueError):
        rows.pop_many(["k1", "k2", "k1"])
    assert len(rows) == 100 and rows.rows_array(keys).tolist() == list(range(100))
    for bad in ([-1], [100]):
        with pytest.raises(IndexError):
            ids.move_many(bad, [0])
        with pytest.raises(IndexError):
            ids.move_many([0], bad)
    with pytest.raises(ValueError):
        ids.move_many([0, 1], [2])
    with pytest.raises(IndexError):
        ids.truncate(101)
    with pytest.raises(ValueError):
        rows.remap([1], [-1])
    assert ids.tolist() == keys
    everything = rows.pop_many(keys[::-1])
    assert everything.tolist() == list(range(99, -1, -1)) and len(rows) == 0 and len(rows._rows) == 8
    ids.truncate(0)
    assert ids.tolist() == [] and ids.id_bytes == 0


@pytest.mark.parametrize("count", [0, 1, 10, TAKE_ONE_BY_ONE, TAKE_ONE_BY_ONE + 1])
def test_take_of_few_rows_reads_them_as_the_vectorised_path_does(count: int) -> None:
    ids = PackedIds([f"id-{i}-é" if i % 3 else f"img-{i:07d}" for i in range(200)])
    rows = np.array([(i * 37) % 200 for i in range(count)], np.int64)
    expected = [ids[int(row)] for row in rows]
    assert ids.take(rows) == expected
    assert ids.take(rows.tolist()) == expected
    assert ids.take(-1 - rows) == [ids[199 - int(row)] for row in rows]
    with pytest.raises(IndexError):
        ids.take(np.array([*rows.tolist(), 200], np.int64))
    with pytest.raises(ValueError):
        ids.take(np.zeros((1, 2), np.int64))

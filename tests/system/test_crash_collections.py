"""kill -9 while collections are made and dropped, aliases set and dropped, and items written through
them: after each restart the collections, their models, the aliases and every item are exactly what was
acknowledged (plus, at most, the one call in flight at the kill), in real processes."""

from __future__ import annotations

import copy
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imgsearch.client import IndexClient, ServiceError
from tools.local import ServiceProcess, free_port

DIM = 8
ROUNDS = 3
WRITERS = 2


@dataclass
class Catalog:
    """What the index must hold of one writer's names: collection -> (model, items), alias -> collection."""

    collections: dict[str, tuple[str, dict[str, tuple[bytes, dict[str, str]]]]] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)


Op = tuple[str, ...]


def apply(catalog: Catalog, op: Op, vectors: np.ndarray | None) -> Catalog:
    after = copy.deepcopy(catalog)
    kind = op[0]
    if kind == "create":
        after.collections[op[1]] = (op[2], {})
    elif kind == "drop":
        del after.collections[op[1]]
    elif kind == "alias":
        after.aliases[op[1]] = op[2]
    elif kind == "unalias":
        del after.aliases[op[1]]
    else:
        name = after.aliases.get(op[1], op[1])
        items = after.collections[name][1]
        for n, item_id in enumerate(op[2:]):
            if kind == "upsert":
                assert vectors is not None
                items[item_id] = (vectors[n].tobytes(), {"n": item_id})
            else:
                items.pop(item_id, None)
    return after


class Writer(threading.Thread):
    """Random valid changes to its own collections and aliases until the service dies."""

    def __init__(self, prefix: str, address: str, catalog: Catalog, seed: int) -> None:
        super().__init__(daemon=True)
        self.prefix, self.address, self.catalog = prefix, address, catalog
        self.rng = random.Random(seed)
        self.numbers = np.random.default_rng(seed)
        self.pending: tuple[Op, np.ndarray | None] | None = None
        self.acknowledged = 0

    def next_op(self) -> tuple[Op, np.ndarray | None]:
        rng, names = self.rng, [f"{self.prefix}-c{n}" for n in range(4)]
        existing = sorted(self.catalog.collections)
        pointed = set(self.catalog.aliases.values())
        choices: list[Op] = []
        free = [n for n in names if n not in self.catalog.collections]
        if free:
            name = rng.choice(free)
            choices.append(("create", name, f"model-{name}"))
        droppable = [n for n in existing if n not in pointed]
        if droppable and rng.random() < 0.5:
            choices.append(("drop", rng.choice(droppable)))
        if existing:
            choices.append(("alias", f"{self.prefix}-a{rng.randrange(2)}", rng.choice(existing)))
        if self.catalog.aliases:
            choices.append(("unalias", rng.choice(sorted(self.catalog.aliases))))
        targets = existing + sorted(self.catalog.aliases)
        if targets:
            target = rng.choice(targets)
            ids = tuple(dict.fromkeys(f"i{rng.randrange(30)}" for _ in range(rng.randint(1, 4))))
            for _ in range(3):  # item writes are the common case
                choices.append(("upsert", target, *ids))
            choices.append(("delete", target, *ids))
        op = rng.choice(choices)
        vectors = (
            self.numbers.standard_normal((len(op) - 2, DIM)).astype(np.float32) if op[0] == "upsert" else None
        )
        return op, vectors

    def run(self) -> None:
        client = IndexClient(self.address, timeout_s=10)
        try:
            while True:
                op, vectors = self.next_op()
                self.pending = (op, vectors)
                kind = op[0]
                if kind == "create":
                    client.create_collection(op[1], op[2])
                elif kind == "drop":
                    client.drop_collection(op[1])
                elif kind == "alias":
                    client.set_alias(op[1], op[2])
                elif kind == "unalias":
                    client.drop_alias(op[1])
                elif kind == "upsert":
                    assert vectors is not None
                    name = self.catalog.aliases.get(op[1], op[1])
                    model = self.catalog.collections[name][0]
                    metadata = [{"n": i} for i in op[2:]]
                    client.upsert(list(op[2:]), vectors, metadata, "v", model_name=model, collection=op[1])
                else:
                    client.delete(list(op[2:]), collection=op[1])
                self.catalog = apply(self.catalog, op, vectors)
                self.pending = None
                self.acknowledged += 1
        except ServiceError:
            return  # killed
        finally:
            client.close()


def held(client: IndexClient, prefix: str) -> Catalog:
    """The index's collections and aliases of one writer, and every item in them."""
    found = Catalog()
    for info in client.list_collections():
        if not info.name.startswith(prefix + "-"):
            continue
        items: dict[str, tuple[bytes, dict[str, str]]] = {}
        for page in client.scan(with_vectors=True, collection=info.name):
            assert page.vectors is not None
            for item_id, metadata, vector in zip(page.ids, page.metadata, page.vectors, strict=True):
                items[item_id] = (vector.astype(np.float32).tobytes(), metadata)
        assert info.count == len(items)
        found.collections[info.name] = (info.model_name, items)
    found.aliases = {a: c for a, c in client.list_aliases().items() if a.startswith(prefix + "-")}
    return found


def test_kill_9_amid_collection_and_alias_changes_loses_nothing_acknowledged(tmp_path: Path) -> None:
    port = free_port()
    args = ["--data-dir", str(tmp_path / "data"), "--snapshot-every-ops", "25"]
    catalogs = {f"w{n}": Catalog() for n in range(WRITERS)}
    rng = random.Random(11)
    total = 0
    for round_number in range(ROUNDS):
        service = ServiceProcess("index_service", port, args, tmp_path / "index.log").start()
        try:
            service.wait_healthy()
            writers = [
                Writer(name, service.address, catalogs[name], seed=round_number * 10 + n)
                for n, name in enumerate(catalogs)
            ]
            for writer in writers:
                writer.start()
            time.sleep(rng.uniform(0.5, 1.5))
            service.kill()  # SIGKILL: no drain, no snapshot
            for writer in writers:
                writer.join(30)
            total += sum(w.acknowledged for w in writers)
            assert all(w.acknowledged > 5 for w in writers)
        finally:
            service.kill()
        service.start()
        try:
            service.wait_healthy()
            client = IndexClient(service.address, timeout_s=30)
            for writer in writers:
                actual = held(client, writer.prefix)
                possible = [writer.catalog]
                if writer.pending is not None:
                    possible.append(apply(writer.catalog, *writer.pending))
                assert actual in possible, f"{writer.prefix}: the index does not hold what was acknowledged"
                catalogs[writer.prefix] = actual
            client.close()
        finally:
            service.kill()
    assert total > 60
    log = (tmp_path / "index.log").read_text()
    assert "log records replayed" in log and "snapshot of" in log

"""The FAISS backend's collections: named VectorStores and the aliases naming them, in this process.

Every change to the catalog (a collection made or dropped, an alias set or dropped) and every item write
in any collection goes through one journal, the write-ahead log, before it is applied, and so shares one
lsn sequence; a snapshot copies every collection at one lsn (see `state`). A catalog change waits for its
fsync before it is applied; an item write waits for it after its store's lock is released (`sync`), so
concurrent writers share fsyncs (group commit, index_service/wal.py).

Locks, always taken in this order: the catalog's `_lock` (catalog changes, snapshot copies), then a
store's own lock (its writes; a snapshot holds every store's read lock), then `_journal_lock` (one log
append at a time). Readers take no catalog lock: they read `_view`, a (stores, aliases) pair that is
replaced whole on every change, so a lookup through an alias sees the old target or the new one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import ExitStack

from index_service.faiss_store import VectorStore
from index_service.store import (
    DEFAULT_COLLECTION,
    AlreadyExists,
    CatalogOperation,
    CatalogState,
    CollectionInfo,
    CreateCollection,
    DropAlias,
    DropCollection,
    FailedPrecondition,
    ItemOperation,
    NotFound,
    Operation,
    SetAlias,
    Stats,
    StoreState,
    check_name,
    collection_name,
)

_View = tuple[dict[str, VectorStore], dict[str, str]]


class Catalog:
    """Collections and aliases over FAISS; implements store.Collections. Thread-safe."""

    def __init__(
        self,
        state: CatalogState | None = None,
        *,
        max_k: int = 1000,
        journal: Callable[[Operation], int] | None = None,
        sync: Callable[[int], None] | None = None,
    ) -> None:
        self.max_k = max_k
        self.journal = journal  # writes an operation to the log before it is applied; returns its lsn
        self.sync = sync  # returns once the log is durable through an lsn (None: nothing to wait for)
        self.lsn = 0
        self._lock = threading.Lock()
        self._journal_lock = threading.Lock()
        state = state or CatalogState()
        stores = {name: self._new_store(name, collection) for name, collection in state.collections.items()}
        if DEFAULT_COLLECTION not in stores:
            stores[DEFAULT_COLLECTION] = self._new_store(DEFAULT_COLLECTION, None)
        self._view: _View = (stores, dict(state.aliases))
        self.lsn = state.lsn

    def _new_store(self, name: str, state: StoreState | None, model_name: str = "") -> VectorStore:
        return VectorStore(
            state,
            max_k=self.max_k,
            journal=self._write,
            sync=self._sync,
            model_name=model_name,
            name=name,
        )

    def _write(self, operation: Operation) -> int:
        """The one way into the journal: one record at a time, the lsn kept in order. Not yet durable:
        a store calls `_sync` once its lock is released, so writers to any collection share fsyncs."""
        with self._journal_lock:
            if self.journal is None:
                self.lsn += 1
            else:
                self.lsn = self.journal(operation)
            return self.lsn

    def _sync(self, lsn: int) -> None:
        if self.sync is not None:
            self.sync(lsn)

    def _log(self, operation: CatalogOperation) -> int:
        """A catalog change, written and made durable before it is applied (under the catalog's lock:
        they are rare)."""
        lsn = self._write(operation)
        self._sync(lsn)
        return lsn

    # ---- lookups (no lock) ------------------------------------------------------------------

    def lookup(self, name: str) -> tuple[str, VectorStore]:
        wanted = collection_name(name)
        stores, aliases = self._view
        target = aliases.get(wanted, wanted)
        store = stores.get(target)
        if store is None:
            raise NotFound(f"no collection or alias is named {wanted!r} (imgsearch collections list)")
        return target, store

    @property
    def default(self) -> VectorStore:
        return self._view[0][DEFAULT_COLLECTION]

    def collections(self) -> list[CollectionInfo]:
        stores, aliases = self._view
        pointing: dict[str, list[str]] = {}
        for alias, target in aliases.items():
            pointing.setdefault(target, []).append(alias)
        infos = []
        for name in sorted(stores):
            stats = stores[name].stats()
            infos.append(
                CollectionInfo(
                    name,
                    stats.count,
                    stats.dim,
                    stats.model_name,
                    stats.model_version,
                    stats.bytes_used,
                    tuple(sorted(pointing.get(name, ()))),
                )
            )
        return infos

    def aliases(self) -> dict[str, str]:
        return dict(sorted(self._view[1].items()))

    def total(self) -> Stats:
        stores = self._view[0]
        every = [store.stats() for store in stores.values()]
        default = stores[DEFAULT_COLLECTION].stats()
        return Stats(
            sum(s.count for s in every),
            default.dim,
            default.model_version,
            sum(s.bytes_used for s in every),
            default.model_name,
        )

    # ---- changes ------------------------------------------------------------------------------

    def create(self, name: str, model_name: str = "") -> CollectionInfo:
        check_name(name)
        with self._lock:
            stores, aliases = self._view
            if name in stores:
                raise AlreadyExists(f"a collection named {name!r} exists already")
            if name in aliases:
                raise AlreadyExists(
                    f"{name!r} is an alias (of {aliases[name]!r}); a collection cannot share its name"
                )
            operation = CreateCollection(name, model_name)
            self._log(operation)
            self._apply(operation)
        return next(info for info in self.collections() if info.name == name)

    def drop(self, name: str) -> int:
        check_name(name)
        with self._lock:
            stores, aliases = self._view
            if name not in stores:
                if name in aliases:
                    raise NotFound(
                        f"{name!r} is an alias (of {aliases[name]!r}), not a collection: remove it with "
                        "DropAlias (imgsearch aliases drop)"
                    )
                raise NotFound(f"no collection is named {name!r}")
            if name == DEFAULT_COLLECTION:
                raise FailedPrecondition(
                    f"the {DEFAULT_COLLECTION!r} collection cannot be dropped; delete its items instead"
                )
            pointing = sorted(alias for alias, target in aliases.items() if target == name)
            if pointing:
                raise FailedPrecondition(
                    f"collection {name!r} cannot be dropped: the alias {pointing[0]!r} points at it"
                    + (f" (and {len(pointing) - 1} more)" if len(pointing) > 1 else "")
                    + "; move or drop the alias first (imgsearch aliases set / drop)"
                )
            operation = DropCollection(name)
            count = stores[name].drop(lambda: self._log(operation))  # after the writes in flight
            self._apply(operation)
            return count

    def set_alias(self, alias: str, collection: str) -> str:
        check_name(alias, "alias")
        check_name(collection)
        with self._lock:
            stores, aliases = self._view
            if alias in stores:
                raise AlreadyExists(f"a collection is named {alias!r}; an alias cannot share its name")
            if collection not in stores:
                if collection in aliases:
                    raise NotFound(
                        f"{collection!r} is an alias (of {aliases[collection]!r}), not a collection: point "
                        "an alias at a collection"
                    )
                raise NotFound(f"no collection is named {collection!r}")
            previous = aliases.get(alias, "")
            if previous != collection:
                operation = SetAlias(alias, collection)
                self._log(operation)
                self._apply(operation)
            return previous

    def drop_alias(self, alias: str) -> str:
        check_name(alias, "alias")
        with self._lock:
            aliases = self._view[1]
            if alias not in aliases:
                raise NotFound(f"no alias is named {alias!r}")
            target = aliases[alias]
            operation = DropAlias(alias)
            self._log(operation)
            self._apply(operation)
            return target

    def _apply(self, operation: CatalogOperation) -> None:
        """Changes the catalog (a new view); assumes the operation was checked."""
        stores, aliases = dict(self._view[0]), dict(self._view[1])
        if isinstance(operation, CreateCollection):
            stores[operation.name] = self._new_store(operation.name, None, operation.model_name)
        elif isinstance(operation, DropCollection):
            stores.pop(operation.name, None)
            aliases = {alias: target for alias, target in aliases.items() if target != operation.name}
        elif isinstance(operation, SetAlias):
            aliases[operation.alias] = operation.collection
        elif isinstance(operation, DropAlias):
            aliases.pop(operation.alias, None)
        self._view = (stores, aliases)

    # ---- recovery and snapshots ---------------------------------------------------------------

    def replay(self, operation: Operation, lsn: int) -> None:
        """Applies an operation read back from the log at recovery (checked before it was logged)."""
        with self._lock:
            if isinstance(operation, CreateCollection | DropCollection | SetAlias | DropAlias):
                if isinstance(operation, DropCollection) and operation.name in self._view[0]:
                    self._view[0][operation.name].dropped = True
                self._apply(operation)
            else:
                item: ItemOperation = operation
                store = self._view[0].get(item.collection)
                if store is None:
                    raise ValueError(
                        f"lsn {lsn} writes to the collection {item.collection!r}, which does not exist"
                    )
                store.replay(item, lsn)
            self.lsn = lsn

    def state(self, while_consistent: Callable[[], None] | None = None) -> CatalogState:
        """A consistent copy of every collection and alias at one lsn (for a snapshot): catalog changes
        and every store's writers are held off while it is made. `while_consistent` runs then too, so
        what it does (rotating the log) happens exactly at the copy's lsn."""
        with self._lock, ExitStack() as held:
            stores, aliases = self._view
            for name in sorted(stores):
                held.enter_context(stores[name].writers_held())
            lsn = self.lsn
            copies = {name: store.copy_held() for name, store in stores.items()}
            if while_consistent is not None:
                while_consistent()
        states = {name: copied.as_state() for name, copied in copies.items()}  # decoded without the locks
        for state in states.values():
            state.lsn = lsn
        return CatalogState(states, dict(aliases), lsn)

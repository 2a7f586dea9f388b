"""Index: in-process FAISS `IndexFlatL2` beside the gRPC index service, at N = 10k, 100k and 1M.

All in one run, on the same seeded vectors and queries (128-d, k = 10):

- one query at a time, p50 and p99: in-process FAISS with 1 and 2 OpenMP threads, the store in-process
  (`VectorStore.search`, no gRPC), and the service (a child process, through `IndexClient`) as it starts
  by default and with FAISS held to 1 and 2 threads; and the floor of any Python gRPC call, a bare echo
  (bench/echo.py) of the search's request and reply sizes.
- batches of queries: queries/s, the same systems.
- upserts: vectors/s into the store without a journal (in-process), the durable store (write-ahead log,
  fsync per call, in-process) and the service (gRPC + the same log), in big batches and one at a time.
- memory: the service's RSS growth per stored vector after loading N, against 512 raw bytes + the id, beside
  this process's own growth for FAISS and for the store.
- one query with a filter that keeps FILTER_PERCENT of the items (`half = 1`, set on those items after the
  memory is read), through the service and in-process FAISS (one thread, a bitmap of the rows).

At each N the service loads its data dir from empty over gRPC (its RSS is read before and after); up to
Plan.copies_up_to, two copies of that dir then serve the same data with 1 and 2 threads (recovered by
replaying the log). All
systems are timed interleaved, a few calls each in turn, so that anything else running on the machine
weighs on each of them alike.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from bench.echo import EchoServer
from bench.report import Figure, Section, p50_p99_ms, rss_mib
from imgsearch import wire
from imgsearch.client import IndexClient
from imgsearch.filters import Condition, filter_message
from imgsearch.v1 import index_pb2
from index_service.durable import DurableStore
from index_service.faiss_store import VectorStore
from tools.local import ServiceProcess, free_port

DIM = 128
K = 10
SEED = 20_251_125
CHUNK = 10_000  # rows drawn per rng call: the first n vectors are the same whatever the total
QUERY_COUNT = 2_000
LOAD_BATCH = 50_000  # vectors per upsert call when loading (the service gets --max-batch for it)
MAX_MESSAGE_BYTES = 64 << 20  # the service's default; LOAD_BATCH vectors with ids are about 26 MB
SINGLE_UPSERTS = 500
ID_BYTES = len(f"img-{0:07d}")
FILTER_PERCENT = 50  # the filtered one-query figures: a filter that keeps this share of the items
FILTER_KEY = "half"
FILTER = (Condition(FILTER_KEY, "equals", ("1",)),)
ONE_QUERY_TARGET = 0.6  # issue 18: one query at 1M <= 0.6x one-thread FAISS (every core, merged exactly)
BATCH_TARGET = 0.8
MEMORY_TARGET = 1.3


def make_vectors(count: int, seed: int = SEED) -> np.ndarray:
    """Returns `count` standard-normal float32 vectors; a prefix of a longer call with the same seed."""
    rng = np.random.default_rng(seed)
    out = np.empty((count, DIM), dtype=np.float32)
    for start in range(0, count, CHUNK):
        stop = min(count, start + CHUNK)
        out[start:stop] = rng.standard_normal((CHUNK, DIM), dtype=np.float32)[: stop - start]
    return out


def make_queries(count: int = QUERY_COUNT) -> np.ndarray:
    """Query vectors from another seed (not stored), the same distribution."""
    return make_vectors(count, SEED + 1)


def item_ids(start: int, stop: int) -> list[str]:
    return [f"img-{i:07d}" for i in range(start, stop)]


def label_n(n: int) -> str:
    return f"{n // 1_000_000}M" if n >= 1_000_000 and n % 1_000_000 == 0 else f"{n // 1000}k"


@dataclass(frozen=True)
class Plan:
    sizes: tuple[int, ...]
    single: dict[int, tuple[int, int]]  # by N: (rounds, calls per round) of one query each
    batch: int  # queries per batched call
    batch_rounds: dict[int, int]  # one call per round
    durable_vectors: int  # vectors upserted into the in-process durable store
    batch_rest_s: float = 0.3  # the rest before each turn of batches (see REST_BETWEEN_TURNS_S)
    copies_up_to: int = 100_000  # the copies with FAISS held to 1 and 2 threads run up to this N


# faiss 1.15 searches with BLAS only from nq * d >= faiss.cvar.distance_compute_blas_threshold; its default,
# 128,000, is lowered to 8,192 by index_service.faiss_store (imported here too, so in-process FAISS and the
# service alike): at d = 128, batches from 64 queries; smaller ones scan query by query.
NORMAL = Plan(
    sizes=(10_000, 100_000, 1_000_000),
    single={10_000: (15, 20), 100_000: (16, 10), 1_000_000: (15, 4)},
    batch=1_000,
    batch_rounds={10_000: 8, 100_000: 5, 1_000_000: 3},
    durable_vectors=200_000,
)
QUICK = Plan(
    sizes=(10_000, 50_000),
    single={10_000: (4, 10), 50_000: (4, 5)},
    batch=1_000,
    batch_rounds={10_000: 2, 50_000: 2},
    durable_vectors=50_000,
    batch_rest_s=0.1,
    copies_up_to=10_000,
)


def search_reply_bytes() -> int:
    """The size of a search reply for one query: k matches with ids like ours, no metadata."""
    matches = [index_pb2.Match(id=item_id, distance=12.5) for item_id in item_ids(0, K)]
    return index_pb2.SearchResponse(results=[index_pb2.Neighbors(matches=matches)]).ByteSize()


# ---- the service as a child process -------------------------------------------------------------


@contextlib.contextmanager
def environment(**values: str | None) -> Iterator[None]:
    """Sets (None: removes) environment variables for the block; a child started in it inherits them."""
    saved = {name: os.environ.get(name) for name in values}
    try:
        for name, value in values.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


FORCED_THREADS_ENV = "IMGSEARCH_BENCH_FAISS_THREADS"


def serve_with_forced_threads() -> None:
    """`python -m bench.index --port ... (index_service flags)`: the index service with every FAISS call
    on $IMGSEARCH_BENCH_FAISS_THREADS OpenMP threads, whatever the store asks for. The store sets its
    threads per search (one for single queries, every core for batches), which OMP_NUM_THREADS alone does
    not override; this makes each thread count measurable in the service."""
    threads = int(os.environ[FORCED_THREADS_ENV])
    chosen = faiss.omp_set_num_threads

    def held(num_threads: int) -> None:  # whatever the store asks for, per call and per thread
        chosen(threads)

    faiss.omp_set_num_threads = held
    chosen(threads)
    from index_service.__main__ import main

    main()


class Service:
    """The index service on a data dir: as it starts by default (`threads` None, no OMP_NUM_THREADS), or
    with FAISS held to `threads` OpenMP threads; `start_s` is from start to healthy (recovery included)."""

    def __init__(
        self, data_dir: Path, threads: int | None, log_path: Path, extra_args: Sequence[str] = ()
    ) -> None:
        self.threads = threads
        self.process = ServiceProcess(
            "index_service" if threads is None else "bench.index",
            free_port(),
            [
                "--data-dir",
                str(data_dir),
                "--max-batch",
                str(LOAD_BATCH),
                "--max-message-bytes",
                str(MAX_MESSAGE_BYTES),
                "--snapshot-every-s",
                "36000",  # no snapshot while timing; the one on stop is timed
                "--log-level",
                "WARNING",
                *extra_args,
            ],
            log_path,
        )
        forced = None if threads is None else str(threads)
        with environment(OMP_NUM_THREADS=forced, **{FORCED_THREADS_ENV: forced}):
            self._start(log_path)

    def _start(self, log_path: Path) -> None:
        """Starts the process and waits until it is healthy; on failure kills it and quotes its log."""
        started = time.perf_counter()
        self.process.start()
        try:
            self.process.wait_healthy(timeout_s=600)
        except RuntimeError as error:
            self.process.kill()
            raise RuntimeError(f"{error}; its log ends:\n{log_tail(log_path)}") from None
        except BaseException:
            self.process.kill()
            raise
        self.start_s = time.perf_counter() - started
        self.client = IndexClient(self.process.address, timeout_s=600)

    @property
    def pid(self) -> int:
        assert self.process.process is not None
        return self.process.process.pid

    def stop(self) -> float:
        """Stops it (with a final snapshot when there were writes); returns the seconds it took."""
        self.client.close()
        started = time.perf_counter()
        code = self.process.stop(timeout_s=600)
        if code not in (0, None):
            raise RuntimeError(
                f"the index service exited with code {code}; its log ends:\n{log_tail(self.process.log_path)}"
            )
        return time.perf_counter() - started

    def kill(self) -> None:
        self.client.close()
        self.process.kill()


def log_tail(path: Path | None, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path else ""
    except OSError:
        return "(no log)"


def load_service(service: Service, vectors: np.ndarray) -> float:
    """Upserts the vectors in LOAD_BATCH batches; returns the seconds it took."""
    started = time.perf_counter()
    for start in range(0, len(vectors), LOAD_BATCH):
        stop = min(len(vectors), start + LOAD_BATCH)
        service.client.upsert(item_ids(start, stop), vectors[start:stop])
    return time.perf_counter() - started


def settled_rss_mib(pid: int) -> float:
    """The RSS after a moment's rest (freed buffers go back to the system lazily)."""
    time.sleep(0.5)
    return rss_mib(pid)


# ---- timing ----------------------------------------------------------------------------------------


def _machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy since boot (all cores, from /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_s() -> float:
    """CPU seconds of this process and its reaped children (the services it started and stopped)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


class OtherLoad:
    """How much CPU the rest of the machine used while a section ran: on 2 cores, anything else running
    (another benchmark, a build) slows what is timed here, the 2-thread settings most."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.busy = _machine_busy_s() if Path("/proc/stat").exists() else 0.0
        self.own = _own_s()

    def note(self) -> str:
        wall = time.monotonic() - self.started
        if not Path("/proc/stat").exists() or wall <= 0:
            return f"The section took {wall:.0f} s."
        others = max(0.0, (_machine_busy_s() - self.busy) - (_own_s() - self.own))
        cores = len(os.sched_getaffinity(0))
        return (
            f"The section took {wall:.0f} s. Other processes used {others:.0f} CPU-seconds meanwhile, "
            f"{others / (wall * cores):.0%} of the machine's {cores} cores (0% is a quiet machine)."
        )


@contextlib.contextmanager
def faiss_threads(count: int) -> Iterator[None]:
    saved = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(count)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(saved)


@dataclass
class Timed:
    """A system to time: `prepare` runs (untimed) before each of its turns, `call` is timed."""

    call: Callable[[], object]
    prepare: Callable[[], None] = lambda: None


def cycling(items: list[np.ndarray], search: Callable[[np.ndarray], object]) -> Callable[[], object]:
    """Returns a call that searches the next item each time, round the list."""
    position = [0]

    def call() -> object:
        item = items[position[0] % len(items)]
        position[0] += 1
        return search(item)

    return call


def searcher(client: IndexClient, conditions: Sequence[Condition] = ()) -> Callable[[np.ndarray], object]:
    if conditions:
        return lambda queries: client.search(queries, K, filter=conditions)
    return lambda queries: client.search(queries, K)


def columnar() -> bool:
    """Whether the client can ask for columnar search replies (`IndexClient.search_arrays` and the
    `columnar` request flag): the batched figures then use it, as a caller of big batches would."""
    return callable(getattr(IndexClient, "search_arrays", None)) and (
        "columnar" in index_pb2.SearchRequest.DESCRIPTOR.fields_by_name
    )


def batch_searcher(client: IndexClient) -> Callable[[np.ndarray], object]:
    """Batches go through `search_arrays` (arrays, no `Match` per result) where the client has it."""
    if columnar():
        arrays = client.search_arrays  # type: ignore[attr-defined]
        return lambda queries: arrays(queries, K)
    return searcher(client)


def batch_api() -> str:
    return "`IndexClient.search_arrays` (columnar replies)" if columnar() else "`IndexClient.search`"


def search_request(queries: np.ndarray, conditions: Sequence[Condition] = ()) -> index_pb2.SearchRequest:
    """The SearchRequest the client sends for these queries (batches: columnar where it can be)."""
    request = index_pb2.SearchRequest(queries=wire.pack(queries), k=K, filter=filter_message(conditions))
    if len(queries) > 1 and columnar():
        request.columnar = True  # type: ignore[attr-defined]
    return request


def reply_bytes(client: IndexClient, request: index_pb2.SearchRequest) -> int:
    """The size of the service's real reply to the request (for the echo floor of a batch)."""
    call = client.channel.unary_unary(
        "/imgsearch.v1.Index/Search",
        request_serializer=index_pb2.SearchRequest.SerializeToString,
        response_deserializer=None,
    )
    return len(call(request, timeout=600))


def filter_mask(n: int) -> np.ndarray:
    """The items that get `half = 1`: a seeded FILTER_PERCENT of the first n."""
    return np.random.default_rng(SEED + 3).permutation(n) < n * FILTER_PERCENT // 100


def mark_filtered(client: IndexClient, vectors: np.ndarray, mask: np.ndarray) -> float:
    """Upserts the masked items again, with their vectors, with the metadata `half = 1` (each keeps its
    row); returns the seconds it took."""
    rows = np.flatnonzero(mask)
    started = time.perf_counter()
    for start in range(0, len(rows), LOAD_BATCH):
        part = rows[start : start + LOAD_BATCH]
        ids = [f"img-{row:07d}" for row in part.tolist()]
        client.upsert(ids, vectors[part], [{FILTER_KEY: "1"}] * len(part))
    return time.perf_counter() - started


# OpenMP and OpenBLAS threads spin a while after each parallel region or BLAS call before they sleep
# (milliseconds for libgomp's GOMP_SPINCOUNT, up to about 0.1 s for OpenBLAS); on 2 cores, a system
# whose turn starts while another process's threads still spin pays for them. Each turn starts after a
# rest: this one after single queries, Plan.batch_rest_s after batches (BLAS).
REST_BETWEEN_TURNS_S = 0.05


def interleaved(
    systems: dict[str, Timed], rounds: int, per_round: int, warmup: int, rest_s: float = REST_BETWEEN_TURNS_S
) -> dict[str, np.ndarray]:
    """Times each system `rounds` x `per_round` times, taking turns (the order reversed every other
    round, a rest before each turn); returns the wall times in seconds."""
    times: dict[str, list[float]] = {name: [] for name in systems}
    for system in systems.values():
        system.prepare()
        for _ in range(warmup):
            system.call()
    names = list(systems)
    for turn in range(rounds):
        for name in names if turn % 2 == 0 else reversed(names):
            system = systems[name]
            system.prepare()
            time.sleep(rest_s)
            for _ in range(per_round):
                started = time.perf_counter()
                system.call()
                times[name].append(time.perf_counter() - started)
    return {name: np.array(values) for name, values in times.items()}


# ---- what one N gives -----------------------------------------------------------------------------


@dataclass
class Measured:
    n: int
    single: dict[str, np.ndarray] = field(default_factory=dict)  # seconds per call, by system
    batch_s: dict[str, np.ndarray] = field(default_factory=dict)
    load_s: float = 0.0
    rss_empty_mib: float = 0.0
    rss_loaded_mib: float = 0.0
    rss_replayed_mib: float = float("nan")  # a copy recovered by replaying the log (nan: no copies)
    bytes_used: int = 0
    replay_start_s: float = float("nan")
    stop_s: float = 0.0
    mark_s: float = 0.0  # upserting FILTER_PERCENT of the items again with `half = 1`
    batch_request_bytes: int = 0
    batch_reply_bytes: int = 0
    faiss_bytes: float = float("nan")  # this process's RSS growth per vector for IndexFlatL2, up to n
    store_bytes: float = float("nan")  # ... for the VectorStore (no journal), up to n

    def p50_ms(self, name: str) -> float:
        return p50_p99_ms(self.single[name])[0]

    def qps(self, name: str, batch: int) -> float:
        return batch / float(np.median(self.batch_s[name]))

    def has(self, name: str) -> bool:
        return name in self.single

    def growth_bytes(self) -> float:
        """The service's RSS growth per stored vector, loading n over gRPC."""
        return (self.rss_loaded_mib - self.rss_empty_mib) * 2**20 / self.n


SINGLE_SYSTEMS = [
    ("faiss1", "FAISS in-process, 1 thread"),
    ("faiss2", "FAISS in-process, 2 threads"),
    ("store", "VectorStore in-process"),
    ("service", "service, default"),
    ("service1", "service, FAISS held to 1 thread"),
    ("service2", "service, FAISS held to 2 threads"),
]
# One query with a filter that keeps FILTER_PERCENT of the items (the `half = 1` items).
FILTERED_SYSTEMS = [
    ("faiss1_filtered", "FAISS in-process, 1 thread, bitmap of the rows"),
    ("service_filtered", "service, default, `half = 1`"),
]


def measure_n(
    n: int,
    plan: Plan,
    vectors: np.ndarray,
    queries: np.ndarray,
    flat: faiss.IndexFlatL2,
    store: VectorStore,
    echo: EchoServer,
    scratch: Path,
    single_upsert_rates: list[tuple[str, float]],
) -> Measured:
    """Loads a service with the first n vectors, starts its copies, times every system."""
    measured = Measured(n)
    data_dir = scratch / f"data-{n}"
    services: list[Service] = []
    alive: list[object] = []  # what FAISS's selector points into
    try:
        service = Service(data_dir, None, scratch / f"index-{n}.log")
        services.append(service)
        measured.rss_empty_mib = settled_rss_mib(service.pid)
        measured.load_s = load_service(service, vectors[:n])
        stats = service.client.stats()
        if stats.count != n:
            raise RuntimeError(f"the service holds {stats.count} vectors; {n} were loaded")
        measured.bytes_used = stats.bytes_used
        measured.rss_loaded_mib = settled_rss_mib(service.pid)
        if n <= plan.copies_up_to:
            for threads in (1, 2):
                # A copy of a dir with no writes in flight is a consistent state (README: hot backup).
                copy = scratch / f"data-{n}-{threads}"
                shutil.copytree(data_dir, copy, ignore=shutil.ignore_patterns("LOCK"))
                services.append(Service(copy, threads, scratch / f"index-{n}-{threads}.log"))
            measured.replay_start_s = services[1].start_s
            measured.rss_replayed_mib = settled_rss_mib(services[1].pid)
        # After the memory is read and the copies are made: half the items get `half = 1`.
        mask = filter_mask(n)
        measured.mark_s = mark_filtered(service.client, vectors, mask)
        bits = np.packbits(mask, bitorder="little")
        selector = faiss.IDSelectorBitmap(n, faiss.swig_ptr(bits))
        params = faiss.SearchParameters(sel=selector)  # type: ignore[call-arg]
        alive += [bits, selector, params]

        expected = [f"img-{i:07d}" for i in flat.search(queries[:1], K)[1][0]]
        for each in services:
            found = [m.id for m in each.client.search(queries[:1], K)[0]]
            if found != expected:
                raise RuntimeError(f"a service answered {found}, FAISS {expected}")
        expected = [f"img-{i:07d}" for i in flat.search(queries[:1], K, params=params)[1][0]]
        found = [m.id for m in service.client.search(queries[:1], K, filter=FILTER)[0]]
        if found != expected:
            raise RuntimeError(f"with the filter the service answered {found}, FAISS {expected}")

        singles = [queries[row : row + 1] for row in range(len(queries))]
        batches = [queries[s : s + plan.batch] for s in range(0, len(queries) - plan.batch + 1, plan.batch)]
        request_payload = b"x" * search_request(queries[:1]).ByteSize()
        reply_payload = b"x" * search_reply_bytes()
        batch_request = search_request(batches[0])
        measured.batch_request_bytes = batch_request.ByteSize()
        measured.batch_reply_bytes = reply_bytes(service.client, batch_request)
        batch_request_payload = b"x" * measured.batch_request_bytes
        batch_reply_payload = b"x" * measured.batch_reply_bytes
        clients = [each.client for each in services]
        names = ("service", "service1", "service2")[: len(clients)]

        def one(count: int) -> Callable[[], None]:
            return lambda: faiss.omp_set_num_threads(count)

        rounds, per_round = plan.single[n]
        with faiss_threads(faiss.omp_get_max_threads()):
            systems = {
                "echo_request": Timed(lambda: echo.echo(request_payload, timeout=30)),
                "echo_reply": Timed(lambda: echo.echo(reply_payload, timeout=30)),
                "faiss1": Timed(cycling(singles, lambda q: flat.search(q, K)), one(1)),
                "faiss2": Timed(cycling(singles, lambda q: flat.search(q, K)), one(2)),
                **{
                    name: Timed(cycling(singles, searcher(client)))
                    for name, client in zip(names, clients, strict=True)
                },
                # the store as the service runs it, without gRPC (single queries only: it picks its
                # own threads for batches, and the batch cost is FAISS's)
                "store": Timed(cycling(singles, lambda q: store.search(q, K)), one(1)),
                "faiss1_filtered": Timed(
                    cycling(singles, lambda q: flat.search(q, K, params=params)), one(1)
                ),
                "service_filtered": Timed(cycling(singles, searcher(service.client, FILTER))),
            }
            measured.single = interleaved(systems, rounds, per_round, warmup=5)
            if n >= 500_000:  # no warm-up calls (seconds each): start this process's threads cheaply
                warm = faiss.IndexFlatL2(DIM)
                warm.add(queries)
                for threads in (1, 2):
                    faiss.omp_set_num_threads(threads)
                    warm.search(batches[0], K)
            batch_systems = {
                "echo_batch_request": Timed(lambda: echo.echo(batch_request_payload, timeout=60)),
                "echo_batch_reply": Timed(lambda: echo.echo(batch_reply_payload, timeout=60)),
                "faiss1": Timed(cycling(batches, lambda q: flat.search(q, K)), one(1)),
                "faiss2": Timed(cycling(batches, lambda q: flat.search(q, K)), one(2)),
                **{
                    name: Timed(cycling(batches, batch_searcher(client)))
                    for name, client in zip(names, clients, strict=True)
                },
            }
            measured.batch_s = interleaved(
                batch_systems,
                plan.batch_rounds[n],
                1,
                warmup=0 if n >= 500_000 else 1,
                rest_s=plan.batch_rest_s,
            )

        if n == plan.sizes[0]:  # after the timing: 500 more vectors change nothing measured after
            single_upsert_rates.append(
                ("service (gRPC + log + fsync)", single_upserts(services[0].client.upsert, vectors))
            )
    finally:
        for copy_service in services[1:]:
            copy_service.kill()
        if services:
            measured.stop_s = services[0].stop()
    return measured


# ---- upserts ---------------------------------------------------------------------------------------


def single_upserts(upsert: Callable[[list[str], np.ndarray], object], vectors: np.ndarray) -> float:
    """Upserts SINGLE_UPSERTS new ids one call each; returns vectors/s."""
    started = time.perf_counter()
    for row in range(SINGLE_UPSERTS):
        upsert([f"single-{row:05d}"], vectors[row : row + 1])
    return SINGLE_UPSERTS / (time.perf_counter() - started)


def durable_rates(vectors: np.ndarray, count: int, scratch: Path) -> tuple[float, float]:
    """The durable store in-process (the store + the log: encode, write, fsync per call); returns
    (vectors/s in LOAD_BATCH batches, vectors/s one at a time)."""
    data_dir = scratch / "durable"
    durable = DurableStore(data_dir)  # no snapshot thread: only the log
    try:
        started = time.perf_counter()
        for start in range(0, count, LOAD_BATCH):
            stop = min(count, start + LOAD_BATCH)
            durable.store.upsert(item_ids(start, stop), vectors[start:stop])
        batched = count / (time.perf_counter() - started)
        return batched, single_upserts(lambda i, v: durable.store.upsert(i, v), vectors)
    finally:
        durable.close(snapshot=False)
        shutil.rmtree(data_dir, ignore_errors=True)


# ---- the section -----------------------------------------------------------------------------------


@dataclass
class Results:
    plan: Plan
    per_n: list[Measured]
    store_batched: float  # vectors/s, in-process store without a journal, loading up to the largest N
    store_single: float
    durable_batched: float
    durable_single: float
    service_single: float
    request_bytes: int
    reply_bytes: int


def run(out: Path, quick: bool) -> list[Section]:
    plan = QUICK if quick else NORMAL
    load = OtherLoad()
    vectors = make_vectors(max(plan.sizes))
    queries = make_queries()
    scratch = Path(tempfile.mkdtemp(prefix="imgsearch-bench-index-"))
    echo = EchoServer()
    single_rates: list[tuple[str, float]] = []
    per_n: list[Measured] = []
    try:
        flat = faiss.IndexFlatL2(DIM)
        store = VectorStore()  # no journal: what the service holds in memory
        store_upsert_s = 0.0
        loaded = 0
        faiss_mib = store_mib = 0.0  # this process's RSS growth for each, so far
        for n in plan.sizes:
            before = rss_mib(os.getpid())
            flat.add(vectors[loaded:n])
            after = rss_mib(os.getpid())
            faiss_mib += after - before
            started = time.perf_counter()
            for start in range(loaded, n, LOAD_BATCH):
                stop = min(n, start + LOAD_BATCH)
                store.upsert(item_ids(start, stop), vectors[start:stop])
            store_upsert_s += time.perf_counter() - started
            store_mib += rss_mib(os.getpid()) - after
            loaded = n
            print(f"bench: index, N = {label_n(n)} ...", file=sys.stderr, flush=True)
            measured = measure_n(n, plan, vectors, queries, flat, store, echo, scratch, single_rates)
            measured.faiss_bytes, measured.store_bytes = faiss_mib * 2**20 / n, store_mib * 2**20 / n
            per_n.append(measured)
        store_single = single_upserts(lambda i, v: store.upsert(i, v), vectors)
        flat.reset()  # free their memory
        store = VectorStore()
        durable_batched, durable_single = durable_rates(vectors, min(plan.durable_vectors, loaded), scratch)
    finally:
        echo.close()
        shutil.rmtree(scratch, ignore_errors=True)
    results = Results(
        plan,
        per_n,
        loaded / store_upsert_s,
        store_single,
        durable_batched,
        durable_single,
        single_rates[0][1],
        index_pb2.SearchRequest(queries=wire.pack(queries[:1]), k=K).ByteSize(),
        search_reply_bytes(),
    )
    section = report(results, out)
    section.notes.append(load.note())
    return [section]


def echo_floor_ms(m: Measured) -> float:
    """The floor of one search call: the mean of the echoes of the request's and the reply's sizes."""
    return (m.p50_ms("echo_request") + m.p50_ms("echo_reply")) / 2


def batch_floor_s(m: Measured) -> float:
    """The floor of one batched call: the mean of the medians of the echoes of its request and reply."""
    return float(np.median(m.batch_s["echo_batch_request"]) + np.median(m.batch_s["echo_batch_reply"])) / 2


def batch_reference_qps(m: Measured, batch: int) -> tuple[float, str]:
    """Queries/s of echo + the better in-process FAISS thread setting, and which setting that was."""
    best = min(("faiss1", "faiss2"), key=lambda key: float(np.median(m.batch_s[key])))
    return batch / (batch_floor_s(m) + float(np.median(m.batch_s[best]))), best[-1]


def target_key(prefix: str, n: int) -> str:
    """The TARGETS key of a figure at N: issue 18 names 10k, 100k and 1M."""
    return f"{prefix}-{label_n(n)}" if n in (10_000, 100_000, 1_000_000) else ""


def one_query_figures(results: Results) -> list[Figure]:
    figures: list[Figure] = []
    largest = results.per_n[-1]
    for m in results.per_n[:-1]:
        floor = echo_floor_ms(m)
        best = min(m.p50_ms("faiss1"), m.p50_ms("faiss2"))
        value = m.p50_ms("service")
        ratio = value / (floor + best)
        has_target = m.n >= 50_000
        figures.append(
            Figure(
                f"index service search, one query, k = {K}, p50, N = {label_n(m.n)}",
                value,
                "ms",
                f"echo + in-process IndexFlatL2, better threads ({floor:.2f} + {best:.2f})",
                floor + best,
                ratio,
                "ratio <= 1.3" if has_target else "",
                (ratio <= 1.3) if has_target else None,
                f"in-process FAISS 1 / 2 threads {m.p50_ms('faiss1'):.2f} / {m.p50_ms('faiss2'):.2f} ms; "
                f"the store alone in-process {m.p50_ms('store'):.2f} ms",
            )
        )
    m = largest
    one_thread = m.p50_ms("faiss1")
    value = m.p50_ms("service")
    ratio = value / one_thread
    floor = echo_floor_ms(m)
    figures.append(
        Figure(
            f"index service search, one query, k = {K}, p50, N = {label_n(m.n)}",
            value,
            "ms",
            "in-process IndexFlatL2, one thread (p50)",
            one_thread,
            ratio,
            f"ratio <= {ONE_QUERY_TARGET}",
            ratio <= ONE_QUERY_TARGET,
            f"against echo + one-thread FAISS ({floor:.2f} + {one_thread:.2f} ms): "
            f"{value / (floor + one_thread):.2f}; in-process FAISS with 2 OpenMP threads on one query: "
            f"{m.p50_ms('faiss2'):.2f} ms"
            + (
                ""
                if ratio <= ONE_QUERY_TARGET
                else f"; met would need the search spread over every core ({len(os.sched_getaffinity(0))} "
                "here) and merged, for at most "
                f"{ONE_QUERY_TARGET * one_thread:.1f} ms"
            ),
            headline="one-1M",  # at the largest N (1M but in --quick runs)
        )
    )
    one_thread = m.p50_ms("faiss1_filtered")
    value = m.p50_ms("service_filtered")
    ratio = value / one_thread
    figures.append(
        Figure(
            f"index service search with a filter keeping {FILTER_PERCENT} % (`{FILTER_KEY} = 1`), one query, "
            f"k = {K}, p50, N = {label_n(m.n)}",
            value,
            "ms",
            f"in-process IndexFlatL2 with a bitmap of the {FILTER_PERCENT} %, one thread (p50)",
            one_thread,
            ratio,
            f"ratio <= {ONE_QUERY_TARGET}",
            ratio <= ONE_QUERY_TARGET,
            f"against echo + that FAISS ({floor:.2f} + {one_thread:.2f} ms): "
            f"{value / (floor + one_thread):.2f}; unfiltered, the service takes {m.p50_ms('service'):.2f} "
            "ms. "
            "The service computes every row's distance and masks those not selected (parallel_knn's dense "
            "path, the scan shared by the cores): a bitmap search computes only the selected rows but one "
            "at a time, behind a branch on each bit",
            headline="one-1M-filtered",
        )
    )
    return figures


def batch_figures(results: Results) -> list[Figure]:
    plan = results.plan
    figures: list[Figure] = []
    first = results.per_n[0]
    for m in results.per_n:
        reference_qps, threads = batch_reference_qps(m, plan.batch)
        value = m.qps("service", plan.batch)
        ratio = value / reference_qps
        faiss_ms = float(np.median(m.batch_s["faiss" + threads])) * 1e3
        note = (
            f"through {batch_api()}; reference: echo of the request's {m.batch_request_bytes / 1024:,.0f} "
            f"KiB and the reply's {m.batch_reply_bytes / 1024:,.0f} KiB ({batch_floor_s(m) * 1e3:.1f} ms) "
            f"+ FAISS with {threads} thread(s) ({faiss_ms:.0f} ms)"
        )
        if ratio < BATCH_TARGET:
            extra_us = (1 / value - 1 / reference_qps) * 1e6
            base_reference, _ = batch_reference_qps(first, plan.batch)
            base_us = (1 / first.qps("service", plan.batch) - 1 / base_reference) * 1e6
            note += (
                f". {extra_us:.0f} µs a query over the reference; at N = {label_n(first.n)}, where FAISS "
                f"costs little, {base_us:.0f} µs a query: the per-result work of the reply "
                f"({plan.batch * K:,} results a call) that batching does not amortise"
            )
            if "service1" in m.batch_s:
                held = [m.qps(key, plan.batch) / reference_qps for key in ("service1", "service2")]
                note += f". Held to 1 / 2 threads the service reaches {held[0]:.0%} / {held[1]:.0%}"
        figures.append(
            Figure(
                f"index service, batches of {plan.batch:,} queries, N = {label_n(m.n)}",
                value,
                "queries/s",
                "echo of the batch + in-process IndexFlatL2, better threads",
                reference_qps,
                ratio,
                f"ratio >= {BATCH_TARGET}",
                ratio >= BATCH_TARGET,
                note,
                headline=target_key("batch", m.n),
            )
        )
    return figures


def memory_figure(results: Results) -> Figure:
    largest = results.per_n[-1]
    per_vector = largest.growth_bytes()
    raw = 4 * DIM + ID_BYTES
    ratio = per_vector / raw
    met = ratio <= MEMORY_TARGET
    return Figure(
        f"index service memory per stored vector (RSS growth loading N = {label_n(largest.n)} over gRPC)",
        per_vector,
        "bytes",
        f"raw vector + id ({4 * DIM} + {ID_BYTES})",
        raw,
        ratio,
        f"ratio <= {MEMORY_TARGET}",
        met,
        f"in this process at that N: IndexFlatL2 grew {largest.faiss_bytes:.0f} bytes a vector, the store "
        f"(no journal) {largest.store_bytes:.0f}; `Stats.bytes_used` {largest.bytes_used / largest.n:.0f}"
        + (
            ""
            if met
            else f"; {per_vector - raw:.0f} bytes a vector over the raw data, "
            f"{per_vector - largest.store_bytes:.0f} of them over the same store in this process: heap the "
            "service process keeps after a load over gRPC (request buffers, the journal's writes, allocator "
            "slack), not the store's own arrays (ids packed, an array hash map)"
        ),
        headline="memory-1M",
    )


def report(results: Results, out: Path) -> Section:
    plan = results.plan
    section = Section("Index: in-process FAISS and the index service")
    section.notes += [
        f"{DIM}-d float32 vectors, standard normal from a seeded numpy rng; {QUERY_COUNT:,} other vectors "
        f"as queries, used in turn; k = {K}. Ids `img-0000000` ({ID_BYTES} bytes), no metadata (until the "
        "filtered figures: see below).",
        "*FAISS in-process*: `faiss.IndexFlatL2` in this process, `faiss.omp_set_num_threads` 1 or 2. "
        "*VectorStore in-process*: the service's store without gRPC (FAISS, the id maps, `Match` objects), "
        "single queries only, with its own thread choice (where it makes none: 1 thread). *Service*: "
        "`python -m index_service` as a child process, called through "
        f"`IndexClient.search` (pack, gRPC over loopback, unpack into `Match`es; batches through "
        f"{batch_api()}): *default* loaded the data over gRPC and runs as it starts by default (no "
        f"`OMP_NUM_THREADS`); up to N = {label_n(plan.copies_up_to)}, two copies of its data dir "
        "serve the same data (recovered by replaying the log) with FAISS held to 1 and 2 threads "
        "(`python -m bench.index`: the service with `faiss.omp_set_num_threads` pinned, and "
        "`OMP_NUM_THREADS` set). All started with `--max-batch 50000` for the load and "
        "`--snapshot-every-s 36000` so that no snapshot runs while timing.",
        f"Echo floor: a bare gRPC echo (bench/echo.py, a child process) of the search request's "
        f"{results.request_bytes} bytes and of the reply's {results.reply_bytes} bytes (each echoed both "
        "ways); the floor is the mean of their p50s, timed among the others at each N. For batches, the "
        "echo of the batch's request and of the service's real reply to it, timed among the batches.",
        f"Batches: {plan.batch:,} queries a call, queries/s of the median call. faiss 1.15 uses BLAS only "
        f"from nq x d >= `faiss.cvar.distance_compute_blas_threshold` = "
        f"{faiss.cvar.distance_compute_blas_threshold:,}, i.e. from 1,000 queries at d = 128; smaller "
        "batches are scanned query by query, several times slower per query.",
        f"Filtered: after the service's memory is read (and its copies made), {FILTER_PERCENT} % of the "
        f"items (seeded) are upserted again, same vectors, with the metadata `{FILTER_KEY} = 1` (each "
        f"keeps its row); the filter is `{FILTER_KEY} = 1`. Its reference is FAISS in this process on one "
        "thread with `SearchParameters(sel=IDSelectorBitmap)` of those rows (the bitmap made once).",
        f"One query at the largest N (issue 18): the service against one-thread FAISS, <= "
        f"{ONE_QUERY_TARGET}x, which only a search spread over every core can reach; below it, against "
        "echo + FAISS (better threads).",
        f"Every system is timed interleaved with the others (a few calls each in turn, after a rest of "
        f"{REST_BETWEEN_TURNS_S} s, {plan.batch_rest_s} s between batches, for the threads of the one "
        "before to go to sleep). On 2 cores, 2 threads lose to 1 as soon as anything else runs: the last "
        "note says how busy the machine was.",
    ]
    section.figures = [
        *one_query_figures(results),
        *batch_figures(results),
        memory_figure(results),
    ]
    largest = results.per_n[-1]
    durable_n = min(plan.durable_vectors, largest.n)
    section.figures.append(
        Figure(
            f"durable store upserts in-process (write-ahead log on), batches of {LOAD_BATCH:,}, "
            f"{label_n(durable_n)} vectors",
            results.durable_batched,
            "vectors/s",
            "the store in-process, no journal (log off)",
            results.store_batched,
            results.durable_batched / results.store_batched,
            note="both without gRPC; the log adds encoding the record, writing it and one fsync per call",
        )
    )
    service_rate = largest.n / largest.load_s
    section.figures.append(
        Figure(
            f"index service upserts, batches of {LOAD_BATCH:,}, loading N = {label_n(largest.n)}",
            service_rate,
            "vectors/s",
            "the store in-process, no journal",
            results.store_batched,
            service_rate / results.store_batched,
            note="the service: packing, gRPC, the log record (JSON ids + vector bytes) and its fsync, the "
            "store; the store alone: validation, FAISS add, the id maps",
        )
    )

    systems = SINGLE_SYSTEMS + FILTERED_SYSTEMS
    header = "| N | echo floor | " + " | ".join(title for _, title in systems) + " |"
    rows = [header, "| --- " * (len(systems) + 2) + "|"]
    for m in results.per_n:
        cells = []
        for key, _ in systems:
            if m.has(key):
                p50, p99 = p50_p99_ms(m.single[key])
                cells.append(f"{p50:.2f} / {p99:.2f}")
            else:
                cells.append("")
        rows.append(
            f"| {label_n(m.n)} ({len(m.single['faiss1'])} calls each) | {echo_floor_ms(m):.3f} | "
            + " | ".join(cells)
            + " |"
        )
    section.tables.append(
        (
            f"One query, k = {K}: p50 / p99 ms (the last two: a filter keeping {FILTER_PERCENT} %)",
            "\n".join(rows),
        )
    )
    batch_systems = [(key, title) for key, title in SINGLE_SYSTEMS if key != "store"]
    header = "| N | echo floor (ms) | " + " | ".join(title for _, title in batch_systems) + " |"
    rows = [header, "| --- " * (len(batch_systems) + 2) + "|"]
    for m in results.per_n:
        cells = [f"{m.qps(key, plan.batch):,.0f}" if key in m.batch_s else "" for key, _ in batch_systems]
        rows.append(
            f"| {label_n(m.n)} ({len(m.batch_s['faiss1'])} calls each) | {batch_floor_s(m) * 1e3:.2f} | "
            + " | ".join(cells)
            + " |"
        )
    section.tables.append((f"Batches of {plan.batch:,} queries, k = {K}: queries/s", "\n".join(rows)))

    rows = [
        "| N | RSS empty (MiB) | RSS loaded (MiB) | growth per vector (bytes) | Stats.bytes_used per vector "
        "| in-process growth per vector: IndexFlatL2 / VectorStore (bytes) | load over gRPC (s) "
        f"| `{FILTER_KEY} = 1` on {FILTER_PERCENT} % (s) | stop with final snapshot (s) "
        "| start of a copy, log replay (s) | RSS of that copy (MiB) |",
        "| --- " * 11 + "|",
    ]
    for m in results.per_n:
        replay = "" if np.isnan(m.replay_start_s) else f"{m.replay_start_s:.1f}"
        replayed = "" if np.isnan(m.rss_replayed_mib) else f"{m.rss_replayed_mib:.0f}"
        rows.append(
            f"| {label_n(m.n)} | {m.rss_empty_mib:.0f} | {m.rss_loaded_mib:.0f} | {m.growth_bytes():.0f} | "
            f"{m.bytes_used / m.n:.0f} | {m.faiss_bytes:.0f} / {m.store_bytes:.0f} | {m.load_s:.1f} | "
            f"{m.mark_s:.1f} | {m.stop_s:.1f} | {replay} | {replayed} |"
        )
    section.tables.append(("The service's memory and data dir", "\n".join(rows)))

    rows = ["| what | vectors a call | vectors | vectors/s |", "| --- | --- | --- | --- |"]
    largest_n = results.per_n[-1].n
    upsert_rows = [
        ("store in-process, no journal", f"{LOAD_BATCH:,}", largest_n, results.store_batched),
        ("durable store in-process (log + fsync)", f"{LOAD_BATCH:,}", durable_n, results.durable_batched),
        *(("service (gRPC + log + fsync)", f"{LOAD_BATCH:,}", m.n, m.n / m.load_s) for m in results.per_n),
        ("store in-process, no journal", "1", SINGLE_UPSERTS, results.store_single),
        ("durable store in-process (log + fsync)", "1", SINGLE_UPSERTS, results.durable_single),
        ("service (gRPC + log + fsync)", "1", SINGLE_UPSERTS, results.service_single),
    ]
    for what, batch, count, rate in upsert_rows:
        rows.append(f"| {what} | {batch} | {count:,} | {rate:,.0f} |")
    section.tables.append(("Upserts", "\n".join(rows)))
    section.notes.append(
        "Upserts: *store, no journal* is `VectorStore.upsert` in this process (validation and copy, FAISS "
        "add, the id and metadata maps), loading up to the largest N; *durable store* adds the write-ahead "
        "log (`DurableStore`: encode a record of JSON ids + vector bytes, write, fsync; no snapshot thread), "
        "into an empty data dir; *service* adds packing, gRPC and unpacking, loading each N from empty (its "
        "snapshot thread runs but no snapshot falls due). One at a time: "
        f"{SINGLE_UPSERTS} calls of one new id each (the service's on the smallest N). Concurrent writers: "
        "the writers section."
    )
    section.plots.append(plot(results, out))
    return section


def plot(results: Results, out: Path) -> Path:
    """Cost growth against N: one query's p50, batched queries/s and memory per vector, the service
    beside in-process FAISS."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plan = results.plan
    sizes = [m.n for m in results.per_n]
    figure, (left, middle, right) = plt.subplots(1, 3, figsize=(17, 5))
    styles = {
        "faiss1": "o-",
        "faiss2": "o--",
        "store": "^:",
        "service": "s-",
        "service1": "s-.",
        "service2": "s--",
        "faiss1_filtered": "o:",
        "service_filtered": "s:",
    }
    for number, (key, title) in enumerate(SINGLE_SYSTEMS + FILTERED_SYSTEMS):
        color = f"C{number}"  # the same colour in every panel
        have = [m for m in results.per_n if m.has(key)]
        if key in dict(FILTERED_SYSTEMS):
            title += f" ({FILTER_PERCENT} %)"
        left.plot([m.n for m in have], [m.p50_ms(key) for m in have], styles[key], color=color, label=title)
        batched = [m for m in results.per_n if key in m.batch_s]
        if batched:
            qps = [m.qps(key, plan.batch) for m in batched]
            middle.plot([m.n for m in batched], qps, styles[key], color=color, label=title)
    left.plot(sizes, [echo_floor_ms(m) for m in results.per_n], ":", color="grey", label="gRPC echo floor")
    raw = 4 * DIM + ID_BYTES
    right.plot(
        sizes, [m.growth_bytes() for m in results.per_n], "s-", color="C3", label="service: RSS growth"
    )
    right.plot(
        sizes, [m.bytes_used / m.n for m in results.per_n], "s:", color="C3", label="service: bytes_used"
    )
    right.plot(
        sizes, [m.faiss_bytes for m in results.per_n], "o-", color="C0", label="in-process IndexFlatL2"
    )
    right.plot(
        sizes, [m.store_bytes for m in results.per_n], "^:", color="C2", label="in-process VectorStore"
    )
    right.axhline(raw, color="grey", linestyle=":", label=f"raw vector + id ({raw} bytes)")
    right.axhline(
        MEMORY_TARGET * raw, color="red", linestyle="--", alpha=0.5, label=f"target {MEMORY_TARGET}x raw"
    )
    for axis in (left, middle, right):
        axis.set_xscale("log")
        axis.set_xlabel("N stored vectors (128-d)")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7)
    left.set_yscale("log")
    middle.set_yscale("log")
    left.set_ylabel("ms, p50")
    left.set_title(f"One query, k = {K}: latency")
    middle.set_ylabel("queries/s")
    middle.set_title(f"Batches of {plan.batch:,} queries: throughput")
    right.set_ylabel("bytes per stored vector")
    right.set_ylim(bottom=0)
    right.set_title("Memory per stored vector")
    figure.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "index_latency_vs_n.png"
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


if __name__ == "__main__":
    serve_with_forced_threads()

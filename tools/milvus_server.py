"""A real Milvus standalone server (PyPI's `milvus` 2.3.5, `milvus-server`) in its own process group, on
free ports: the index tests' third backend and a peer in `make bench`."""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc

from tools.local import free_port

# `milvus-server` (the `milvus` package's main()) with what its flags leave out: its HTTP port (health
# and metrics), which it would otherwise take as the first free one from 9091 (two servers starting at
# once could pick the same), and SO_REUSEADDR when it checks that a port is free (a server killed with
# connections open leaves them in TIME_WAIT, and binding its ports again would fail on restart).
MILVUS_LAUNCHER = """
import socket, sys
import milvus

def try_bind_port(self, port):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        return sock
    except OSError:
        sock.close()
        return None

milvus.MilvusServerConfig.try_bind_port = try_bind_port
milvus.default_server.webservice_port = int(sys.argv.pop(1))
sys.argv[0] = "milvus-server"
milvus.main()
"""


# `milvus-server`'s flag for each port Milvus listens on (index-coord is merged into data-coord in
# standalone 2.3 but has its flag all the same).
MILVUS_PORT_FLAGS = (
    "proxy",
    "etcd",
    "root-coord",
    "proxy-internal",
    "query-coord",
    "query-node",
    "index-coord",
    "index-node",
    "data-coord",
    "data-node",
)


# Settings for a test server (Milvus's defaults otherwise; the COMMON_*/QUERYCOORD_* variables are Milvus's
# own overrides of common.* and queryCoord.*): Strong reads wait for the proxy's next time tick (200 ms by
# default: a fifth of a second per read); a server started again on its data waits for its old sessions'
# leases to expire (30 s by default) before it creates a collection; and loading a new collection waits on
# the query coordinator's checks (with these, about 2 s instead of 3).
MILVUS_TEST_CONFIG = ("proxy.timeTickInterval=20",)
MILVUS_TEST_ENV = {
    "COMMON_SESSION_TTL": "10",
    "QUERYCOORD_CHECKCHANNELINTERVAL": "100",
    "QUERYCOORD_LEADERVIEWUPDATEINTERVAL": "0.1",
    "QUERYCOORD_DISTPULLINTERVAL": "50",
}


@contextlib.contextmanager
def quiet_logger(name: str) -> Iterator[None]:
    """The logger shows only CRITICAL records meanwhile."""
    logger = logging.getLogger(name)
    saved = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(saved)


def group_pids(pgid: int) -> list[int]:
    """The processes of the group still running (zombies, which init may never reap here, aside)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


class MilvusServer:
    """A Milvus 2.3.5 standalone server (the `milvus` package's `milvus-server`, which runs `milvus run
    standalone` as its child) in its own process group, on free ports of 127.0.0.1, with its data in
    `data_dir`; stop() and start() again keep the data and the ports (the URI).

    Every port it listens on is given: the flags' ten, its HTTP port, and its embedded etcd's client and
    peer ports (etcd's own config file: the flag is only where Milvus looks for etcd)."""

    def __init__(
        self,
        data_dir: Path,
        *,
        config: tuple[str, ...] = MILVUS_TEST_CONFIG,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = data_dir / "milvus-server.log"  # the wrapper's; Milvus logs under data_dir/logs
        self.ports = {flag: free_port() for flag in MILVUS_PORT_FLAGS}
        self.http_port, self.etcd_peer_port = free_port(), free_port()
        self.uri = f"http://127.0.0.1:{self.ports['proxy']}"
        self.config = config
        self.env = dict(MILVUS_TEST_ENV if env is None else env)
        self.etcd_config = data_dir / "etcd.yaml"
        etcd, peer = f"http://127.0.0.1:{self.ports['etcd']}", f"http://127.0.0.1:{self.etcd_peer_port}"
        self.etcd_config.write_text(
            f"listen-client-urls: {etcd}\nadvertise-client-urls: {etcd}\n"
            f"listen-peer-urls: {peer}\ninitial-advertise-peer-urls: {peer}\n"
            f"initial-cluster: default={peer}\n"
        )
        self.process: subprocess.Popen[bytes] | None = None
        self._names = itertools.count()
        self.start_s = 0.0  # the last start() until it answered
        atexit.register(self.close)  # a session that ends abruptly still leaves no server behind

    def start(self, timeout_s: float = 120.0) -> MilvusServer:
        """Starts the server and returns once it creates and drops a collection (its health check says
        OK well before that: the root coordinator registers later, and after a kill the new session
        waits for the old one to expire)."""
        assert self.process is None, "the Milvus server is running"
        started = time.monotonic()
        flags = [arg for flag, port in self.ports.items() for arg in (f"--{flag}-port", str(port))]
        extra = [arg for setting in self.config for arg in ("--extra-config", setting)]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [
                    *(sys.executable, "-c", MILVUS_LAUNCHER, str(self.http_port)),
                    *("--data", str(self.data_dir), *flags, *extra),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env={**os.environ, **self.env, "ETCD_CONFIG_PATH": str(self.etcd_config)},
            )
        try:
            self._wait_ready(started + timeout_s)
        except BaseException:
            self.kill()
            raise
        self.start_s = time.monotonic() - started
        return self

    def _wait_ready(self, deadline: float) -> None:
        # pymilvus logs each failed try with its stack at WARNING and ERROR: expected here, until it answers.
        with quiet_logger("pymilvus"):
            while not self._ready():
                assert self.process is not None
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"the Milvus server exited ({self.process.returncode}): {self.log_tail()}"
                    )
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the Milvus server did not answer in time: {self.log_tail()}")
                time.sleep(0.3)

    def _ready(self, probe: str = "_ready_probe") -> bool:
        """Whether the server creates and drops a collection."""
        from pymilvus import DataType, MilvusClient, MilvusException

        try:
            client: Any = MilvusClient(self.uri, timeout=5)
        except (MilvusException, grpc.RpcError):
            return False
        try:
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("id", DataType.INT64, is_primary=True)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=2)
            if client.has_collection(probe, timeout=5):
                client.drop_collection(probe, timeout=5)
            client.create_collection(probe, schema=schema, timeout=30)
            client.drop_collection(probe, timeout=5)
            return True
        except (MilvusException, grpc.RpcError):  # pymilvus passes DEADLINE_EXCEEDED on unwrapped
            return False
        finally:
            client.close()

    def log_tail(self, lines: int = 20) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def pids(self) -> list[int]:
        """The server's processes: the wrapper and its `milvus run standalone`."""
        return group_pids(self.process.pid) if self.process is not None else []

    def new_collection(self) -> str:
        return f"test_{next(self._names)}"

    def drop(self, name: str) -> None:
        from pymilvus import MilvusClient

        client: Any = MilvusClient(self.uri, timeout=30)
        try:
            if client.has_collection(name):
                client.drop_collection(name)
        finally:
            client.close()

    def stop(self, grace_s: float = 3.0) -> None:
        """SIGTERM to the process group, then SIGKILL once grace_s has passed; returns once every
        process of it has exited (the data and ports stay for start()). Milvus 2.3.5 standalone does
        not end on SIGTERM here: it stops its coordinators first, then its nodes retry the stopped root
        coordinator for ever, so the SIGKILL is what ends it."""
        if self.process is None:
            return
        pgid = self.process.pid  # start_new_session: the wrapper leads its own group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while group_pids(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        self._end(pgid)

    def kill(self) -> None:
        """SIGKILL to the whole group at once: Milvus gone as in a crash."""
        if self.process is not None:
            self._end(self.process.pid)

    def _end(self, pgid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        assert self.process is not None
        self.process.wait(30)
        deadline = time.monotonic() + 30
        while group_pids(pgid):
            assert time.monotonic() < deadline, f"the Milvus server's processes (group {pgid}) did not exit"
            time.sleep(0.05)
        self.process = None

    def close(self) -> None:
        """Stops the server and removes the binaries it unpacked into data_dir/bin (246 MB a server)."""
        self.stop()
        shutil.rmtree(self.data_dir / "bin", ignore_errors=True)

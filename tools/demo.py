"""`make demo`: the MNIST sample through both services, end to end, offline.

Writes the sample's index split (the first 8,000 digits) and query split (the last 2,000) as PNG
folders named by label, starts both services as local processes and the web gateway (the page, on
http://localhost:8080 or a free port), indexes the index split, evaluates the query split, draws
out/similar.png for 3 queries, and stops them all. With --keep-running they run on until Ctrl-C, the
services on their default ports (encoder 50051, index 50052: the CLI's defaults) where those are free,
and the demo prints the `export IMGSEARCH_ENCODER=... IMGSEARCH_INDEX=...` line that points the CLI at
them either way.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import shutil
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from imgsearch import client_flags
from imgsearch.cli import main as cli
from imgsearch.flags import Flag
from tools.local import LocalServices, ServiceProcess, free_port, run_until_stopped

SAMPLE = Path(__file__).resolve().parent.parent / "encoder_service" / "data" / "mnist-10k.npz"
INDEX_SPLIT = 8000


def write_split(x: np.ndarray, y: np.ndarray, indices: range, folder: Path) -> None:
    """Writes digits as folder/<label>/<number>.png, unless a previous run already did."""
    if folder.is_dir() and sum(1 for _ in folder.rglob("*.png")) == len(indices):
        return
    shutil.rmtree(folder, ignore_errors=True)
    for n in indices:
        path = folder / str(y[n]) / f"{n:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[n]).save(path)


def port_or_free(wanted: int) -> int:
    """`wanted` when no one listens on it on this machine (on any address, as the services bind all of
    them), else a free port."""
    try:
        if socket.has_dualstack_ipv6():
            probe = socket.create_server(("::", wanted), family=socket.AF_INET6, dualstack_ipv6=True)
        else:
            probe = socket.create_server(("0.0.0.0", wanted))
    except OSError:
        return free_port()
    probe.close()
    return wanted


def default_port(flag: Flag) -> int:
    """The port of a client flag's default address (localhost:50051 for --encoder): where the CLI looks
    when neither the flag nor its env var is set."""
    return int(str(flag.default).rpartition(":")[2])


def export_line(services: LocalServices) -> str:
    """The shell line that points the CLI (and the Python API) at these services."""
    return (
        f"export {client_flags.ENCODER.env}={services.encoder.address} "
        f"{client_flags.INDEX.env}={services.index.address}"
    )


@contextmanager
def started_services(work: Path, keep_running: bool) -> Iterator[LocalServices]:
    """Both services, started, and stopped on leaving: on free ports for a run that stops at the end; to
    keep running, on the CLI's default ports where those are free (so the README's commands work as
    written), else on free ones (and on free ones too should a default port be taken as they start)."""
    services = None
    if keep_running:
        ports = (
            port_or_free(default_port(client_flags.ENCODER)),
            port_or_free(default_port(client_flags.INDEX)),
        )
        try:
            services = LocalServices(work / "index-data", *ports, log_dir=work).__enter__()
        except RuntimeError as error:  # a default port taken meanwhile: the service could not bind it
            print(f"demo: {error}; starting them on free ports instead", file=sys.stderr, flush=True)
    if services is None:
        services = LocalServices(work / "index-data", log_dir=work).__enter__()
    try:
        yield services
    finally:
        services.stop()


def start_page(services: LocalServices, media_root: Path, log_dir: Path, port: int) -> ServiceProcess | None:
    """The web gateway (`python -m web`) as a child process over both services, its media root the folder
    the demo indexes (so thumbnails resolve); None, with a note, when it cannot run here."""
    if any(importlib.util.find_spec(name) is None for name in ("fastapi", "uvicorn", "multipart")):
        print("demo: no page: the web gateway needs pip install -e '.[web]'", file=sys.stderr)
        return None
    page = ServiceProcess(
        "web",
        port_or_free(port),
        [
            "--host",
            "127.0.0.1",
            "--encoder",
            services.encoder.address,
            "--index",
            services.index.address,
            "--media-root",
            str(media_root.absolute()),
        ],
        log_dir / "web.log",
    ).start()
    url = f"http://127.0.0.1:{page.port}/healthz"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and page.process is not None and page.process.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return page
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.2)
    print(f"demo: the page did not start; see {log_dir / 'web.log'}", file=sys.stderr)
    page.stop()
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.demo", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("out"), help="where to write (default out/)")
    parser.add_argument("--seed", type=int, default=3, help="picks the 3 queries drawn")
    parser.add_argument(
        "--keep-running",
        action="store_true",
        help="leave both services and the page running after the demo, until Ctrl-C (make demo KEEP=1)",
    )
    parser.add_argument(
        "--web-port",
        type=int,
        default=int(os.environ.get("IMGSEARCH_WEB_PORT") or 8080),
        help="the page's port, a free one when it is taken (env IMGSEARCH_WEB_PORT, default 8080)",
    )
    args = parser.parse_args(argv)

    started = time.monotonic()
    with np.load(SAMPLE) as sample:
        x, y = sample["x"], sample["y"]
    work = args.out / "demo"
    index_dir, query_dir = work / "index", work / "queries"
    print(f"writing the MNIST sample as PNGs under {work}/ ...", flush=True)
    write_split(x, y, range(INDEX_SPLIT), index_dir)
    write_split(x, y, range(INDEX_SPLIT, len(x)), query_dir)
    shutil.rmtree(work / "index-data", ignore_errors=True)

    print("starting the encoder and index services ...", flush=True)
    with started_services(work, args.keep_running) as services:
        print(f"encoder at {services.encoder.address}, index at {services.index.address}", flush=True)
        page = start_page(services, index_dir, work, args.web_port)
        if page is not None:
            print(f"the page: http://localhost:{page.port} (search by upload or drawing)", flush=True)
        try:
            code = run_steps(args, services, index_dir, query_dir, work)
            if code:
                return code
            if args.keep_running:
                where = f"the page at http://localhost:{page.port}, " if page else ""
                defaults = (services.encoder.address, services.index.address) == (
                    client_flags.ENCODER.default,
                    client_flags.INDEX.default,
                )
                how = (
                    "they are where the CLI looks by default, unless IMGSEARCH_ENCODER or IMGSEARCH_INDEX "
                    "say otherwise"
                    if defaults
                    else "a default port was taken, so they run on free ports"
                )
                print(
                    f"\ndemo done in {time.monotonic() - started:.0f} s; {where}the encoder at "
                    f"{services.encoder.address} and the index at {services.index.address} keep running: "
                    f"Ctrl-C stops them. To use them from another shell ({how}):",
                    flush=True,
                )
                print(export_line(services), flush=True)
                run_until_stopped([services.encoder, services.index, *([page] if page else [])])
                return 0
        finally:
            if page is not None:
                page.stop()
    print(f"\ndemo done in {time.monotonic() - started:.0f} s; the picture is {args.out / 'similar.png'}")
    if page is not None:
        print("the services and the page have stopped; `make demo KEEP=1` leaves them running")
    return 0


def run_steps(
    args: argparse.Namespace, services: LocalServices, index_dir: Path, query_dir: Path, work: Path
) -> int:
    """index, eval and show through the CLI; returns the first failing step's exit code, else 0."""
    address = ["--encoder", services.encoder.address, "--index", services.index.address]
    steps = [
        ["index", str(index_dir)],
        ["eval", str(query_dir), "-k", "10"],
        [
            "show",
            *random.Random(args.seed).sample(sorted(map(str, query_dir.rglob("*.png"))), 3),
            "-k",
            "3",
            "-o",
            str(args.out / "similar.png"),
        ],
    ]
    for step in steps:
        print(f"\n$ imgsearch {' '.join(step[:2])} ...", flush=True)
        code = cli(address + step)
        if code:
            print(f"demo: `imgsearch {step[0]}` failed with code {code}; logs in {work}/", file=sys.stderr)
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())

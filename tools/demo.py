"""`make demo`: the digits and the clothes, side by side in one index service, end to end, offline.

Writes the MNIST sample's index split (the first 8,000 digits) and query split (the last 2,000), and the
Fashion-MNIST sample's first 2,400 images and last 600, as PNG folders named by label (t-shirt, trouser,
...), starts both services as local processes (the encoder with two models: `--models default,fashion`)
and the web gateway (the page, on http://localhost:8080 or a free port, its picker offering both
collections); indexes the digits into the collection `default`, creates the collection `clothes` for
the model `fashion` and indexes the clothes into it, evaluates each on its queries, draws
out/similar.png and out/similar-clothes.png for 3 queries each, and stops them all. With --keep-running
they run on until Ctrl-C, the services on their default ports (encoder 50051, index 50052: the CLI's
defaults) where those are free, and the demo prints the `export IMGSEARCH_ENCODER=...
IMGSEARCH_INDEX=...` line that points the CLI at them either way.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import random
import re
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

DATA = Path(__file__).resolve().parent.parent / "encoder_service" / "data"
SAMPLE = DATA / "mnist-10k.npz"
INDEX_SPLIT = 8000
FASHION_SAMPLE = DATA / "fashion-3k.npz"
FASHION_INDEX_SPLIT = 2400
FASHION_MODEL = "fashion"
CLOTHES = "clothes"  # the collection
ENCODER_ARGS = ("--models", f"default,{FASHION_MODEL}")  # the digits' model (the default) and the clothes'
# Fashion-MNIST's classes 0-9, as folder names (labels)
FASHION_CLASSES = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle-boot",
)


def write_split(
    x: np.ndarray, y: np.ndarray, indices: range, folder: Path, names: tuple[str, ...] | None = None
) -> None:
    """Writes images as folder/<label>/<number>.png (the label is names[y] when names are given),
    unless a previous run already did."""
    if folder.is_dir() and sum(1 for _ in folder.rglob("*.png")) == len(indices):
        return
    shutil.rmtree(folder, ignore_errors=True)
    for n in indices:
        label = names[int(y[n])] if names else str(y[n])
        path = folder / label / f"{n:05d}.png"
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
            services = LocalServices(
                work / "index-data", *ports, log_dir=work, encoder_args=ENCODER_ARGS
            ).__enter__()
        except RuntimeError as error:  # a default port taken meanwhile: the service could not bind it
            print(f"demo: {error}; starting them on free ports instead", file=sys.stderr, flush=True)
    if services is None:
        services = LocalServices(work / "index-data", log_dir=work, encoder_args=ENCODER_ARGS).__enter__()
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
    parser.add_argument("--seed", type=int, default=3, help="picks the 3 queries drawn of each collection")
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
    with np.load(FASHION_SAMPLE) as sample:
        fx, fy = sample["x"], sample["y"]
    work = args.out / "demo"
    folders = Folders(work)
    print(f"writing the MNIST and Fashion-MNIST samples as PNGs under {work}/ ...", flush=True)
    write_split(x, y, range(INDEX_SPLIT), folders.digits)
    write_split(x, y, range(INDEX_SPLIT, len(x)), folders.digit_queries)
    write_split(fx, fy, range(FASHION_INDEX_SPLIT), folders.clothes, FASHION_CLASSES)
    write_split(fx, fy, range(FASHION_INDEX_SPLIT, len(fx)), folders.clothes_queries, FASHION_CLASSES)
    shutil.rmtree(work / "index-data", ignore_errors=True)

    print(f"starting the encoder ({' '.join(ENCODER_ARGS)}) and index services ...", flush=True)
    with started_services(work, args.keep_running) as services:
        print(f"encoder at {services.encoder.address}, index at {services.index.address}", flush=True)
        page = start_page(services, work, work, args.web_port)  # media root: both image folders
        if page is not None:
            print(
                f"the page: http://localhost:{page.port} (search by upload or drawing; the picker offers "
                f"the collections default and {CLOTHES})",
                flush=True,
            )
        try:
            code, figures, clothes_query = run_steps(args, services, folders, work)
            if code:
                return code
            print()
            for line in figures:
                print(line, flush=True)
            search_clothes = f"imgsearch search --collection {CLOTHES} {clothes_query} -k 5"
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
                print(f"{search_clothes}   # the clothes; without --collection, the digits", flush=True)
                run_until_stopped([services.encoder, services.index, *([page] if page else [])])
                return 0
        finally:
            if page is not None:
                page.stop()
    print(
        f"\ndemo done in {time.monotonic() - started:.0f} s; the pictures are {args.out / 'similar.png'} "
        f"and {args.out / 'similar-clothes.png'}"
    )
    print(
        "the services and the page have stopped; `make demo KEEP=1` leaves them running, and then "
        f"`{search_clothes}` searches the clothes"
    )
    return 0


class Folders:
    """Where the demo writes each split, under `work`: folders of labelled subfolders."""

    def __init__(self, work: Path) -> None:
        self.digits, self.digit_queries = work / "index", work / "queries"
        self.clothes, self.clothes_queries = work / CLOTHES, work / f"{CLOTHES}-queries"


def run_steps(
    args: argparse.Namespace, services: LocalServices, folders: Folders, work: Path
) -> tuple[int, list[str], str]:
    """Indexes, evaluates and draws each collection through the CLI. Returns the first failing step's exit
    code (else 0), a line of figures per collection, and a clothes query (for the line that shows how to
    search them)."""
    address = ["--encoder", services.encoder.address, "--index", services.index.address]

    def drawn(folder: Path) -> list[str]:
        return random.Random(args.seed).sample(sorted(map(str, folder.rglob("*.png"))), 3)

    clothes_drawn = drawn(folders.clothes_queries)
    collection = ["--collection", CLOTHES]
    steps = [
        ["index", str(folders.digits)],
        ["eval", str(folders.digit_queries), "-k", "10"],
        ["show", *drawn(folders.digit_queries), "-k", "3", "-o", str(args.out / "similar.png")],
        ["collections", "create", CLOTHES, "--model", FASHION_MODEL],
        ["index", *collection, str(folders.clothes)],
        ["eval", *collection, str(folders.clothes_queries), "-k", "10"],
        ["show", *collection, *clothes_drawn, "-k", "3", "-o", str(args.out / "similar-clothes.png")],
    ]
    what = {
        str(folders.digit_queries): ("digits", "default", "default", INDEX_SPLIT),
        str(folders.clothes_queries): ("clothes", CLOTHES, FASHION_MODEL, FASHION_INDEX_SPLIT),
    }
    figures: list[str] = []
    for step in steps:
        shown = step[: next((n + 1 for n, word in enumerate(step) if "/" in word), len(step))]
        print(f"\n$ imgsearch {' '.join(shown)}{' ...' if len(shown) < len(step) else ''}", flush=True)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed) if step[0] == "eval" else contextlib.nullcontext():
            code = cli(address + step)
        print(printed.getvalue(), end="", flush=True)
        if code:
            print(f"demo: `imgsearch {step[0]}` failed with code {code}; logs in {work}/", file=sys.stderr)
            return code, figures, clothes_drawn[0]
        if step[0] == "eval":
            name, in_collection, model, indexed = what[step[-3]]
            found = re.search(r"^queries (\d+).*$\n^P@1 +(\S+)$\n^P@10 +(\S+)$", printed.getvalue(), re.M)
            queries, p1, p10 = found.groups() if found else ("?", "?", "?")
            figures.append(
                f"{name + ':':<8} collection {in_collection!r}, model {model!r}, {indexed:,} indexed, "
                f"{queries} queries: P@10 {p10} (P@1 {p1})"
            )
    return 0, figures, clothes_drawn[0]


if __name__ == "__main__":
    sys.exit(main())

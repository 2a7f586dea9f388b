"""`make demo`: the MNIST sample through both services, end to end, offline.

Writes the sample's index split (the first 8,000 digits) and query split (the last 2,000) as PNG
folders named by label, starts both services as local processes, indexes the index split, evaluates
the query split, draws out/similar.png for 3 queries, and stops the services.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from imgsearch.cli import main as cli
from imgsearch.local import LocalServices

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imgsearch.demo", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("out"), help="where to write (default out/)")
    parser.add_argument("--seed", type=int, default=3, help="picks the 3 queries drawn")
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
    with LocalServices(work / "index-data", log_dir=work) as services:
        print(f"encoder at {services.encoder.address}, index at {services.index.address}", flush=True)
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
                print(
                    f"demo: `imgsearch {step[0]}` failed with code {code}; logs in {work}/", file=sys.stderr
                )
                return code
    print(f"\ndemo done in {time.monotonic() - started:.0f} s; the picture is {args.out / 'similar.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

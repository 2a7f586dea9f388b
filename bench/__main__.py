"""`python -m bench` (`make bench`): runs the sections, writes bench/results/REPORT.md and the plots."""

from __future__ import annotations

import argparse
import functools
import importlib
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench.busy import Load, Meter
from bench.report import Section, write_report

MAX_RUNS = 2  # a section measured on a busy machine runs once more; the quieter run is kept

# Each section module has `run(out: Path, quick: bool) -> list[Section]`.
SECTIONS = ["encoder", "index", "filters", "duplicates", "peers", "e2e", "hostile"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and smaller N: a smoke run")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="where the report goes")
    args = parser.parse_args(argv)
    started = time.monotonic()
    sections: list[Section] = []
    for name in args.sections.split(","):
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        module = importlib.import_module(f"bench.{name}")
        run = functools.partial(module.run, args.out, args.quick)
        sections += run_section(name, run, 1 if args.quick else MAX_RUNS)
    command = "make bench"
    if args.quick or args.sections != ",".join(SECTIONS):
        command = " ".join(
            ["python -m bench", *(["--quick"] if args.quick else []), f"--sections {args.sections}"]
        )
    report = write_report(sections, args.out / "REPORT.md", command, time.monotonic() - started)
    print(f"bench: wrote {report} in {(time.monotonic() - started) / 60:.1f} minutes", file=sys.stderr)
    return 0


def run_section(name: str, run: Callable[[], list[Section]], max_runs: int) -> list[Section]:
    """Runs a section, again while the machine was busy (up to max_runs in all), and keeps the run on the
    quietest machine; each of its sections gets a note saying how busy the machine was."""
    runs: list[tuple[Load, list[Section]]] = []
    while len(runs) < max_runs and (not runs or runs[-1][0].busy):
        with Meter() as meter:
            result = run()
        runs.append((meter.load, result))
        print(
            f"bench: {name} took {meter.load.seconds:.0f} s; {meter.load.note(1)}",
            file=sys.stderr,
            flush=True,
        )
    load, kept = min(runs, key=lambda run_: run_[0].other_cores)
    for section in kept:
        section.notes = [*section.notes, load.note(len(runs))]
    return kept


if __name__ == "__main__":
    sys.exit(main())

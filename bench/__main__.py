"""`python -m bench` (`make bench`): runs the sections, writes bench/results/REPORT.md and the plots, and
(a full run into bench/results only) the README's Speed section from the same figures."""

from __future__ import annotations

import argparse
import functools
import importlib
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench.busy import BUSY_CORES, Load, Meter
from bench.report import Section, speed_block, update_readme, write_report

MAX_RUNS = 2  # a section measured on a busy machine runs once more (time allowing); the quieter run is kept
RESULTS = Path("bench/results")
README = Path(__file__).resolve().parent.parent / "README.md"

# Each section module has `run(out: Path, quick: bool) -> list[Section]`.
SECTIONS = ["encoder", "index", "filters", "writers", "collections", "duplicates", "peers", "e2e", "hostile"]

# What one run of each section takes on a quiet 2-core machine (seconds, full plan), from its start to its
# return, estimated from the 2026-11-25 run and --quick runs scaled to the full plans (about 11.5 minutes in
# all): what the budget expects of the sections still to come when it decides on a second run.
EXPECTED_S = {
    "encoder": 135,
    "index": 190,
    "filters": 35,
    "writers": 20,
    "collections": 30,
    "duplicates": 45,
    "peers": 115,
    "e2e": 70,
    "hostile": 40,
}
BUDGET_S = 13 * 60  # the whole `make bench`: a busy section runs again only if the run still fits in this


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and smaller N: a smoke run")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the report goes")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=BUDGET_S,
        help="a busy section runs again only while the whole run still fits in this many seconds",
    )
    args = parser.parse_args(argv)
    names = args.sections.split(",")
    unknown = [name for name in names if name not in SECTIONS]
    if unknown:
        parser.error(f"unknown sections {', '.join(unknown)}; the sections are {', '.join(SECTIONS)}")
    started = time.monotonic()
    sections: list[Section] = []
    for position, name in enumerate(names):
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        module = importlib.import_module(f"bench.{name}")
        run = functools.partial(module.run, args.out, args.quick)
        still_to_come = sum(EXPECTED_S.get(later, 60) for later in names[position + 1 :])

        def fits(seconds: float, still_to_come: float = still_to_come) -> bool:
            return time.monotonic() - started + seconds + still_to_come <= args.budget_s

        for section in run_section(name, run, 1 if args.quick else MAX_RUNS, fits):
            section.source = name
            sections.append(section)
    full = not args.quick and names == SECTIONS
    command = "make bench"
    if not full:
        command = " ".join(
            ["python -m bench", *(["--quick"] if args.quick else []), f"--sections {args.sections}"]
        )
    seconds = time.monotonic() - started
    notes = [
        f"Each section is timed while this machine's other load is metered (bench/busy.py); a section "
        f"during which other processes kept more than {BUSY_CORES} cores busy runs once more, and the "
        f"quieter run is kept, when the second run still lets the whole run finish within "
        f"{args.budget_s / 60:.0f} minutes (the section's note says which)."
    ]
    report = write_report(sections, args.out / "REPORT.md", command, seconds, notes)
    print(f"bench: wrote {report} in {seconds / 60:.1f} minutes", file=sys.stderr)
    if full and args.out.resolve() == (README.parent / RESULTS).resolve():
        link = RESULTS.joinpath("REPORT.md").as_posix()
        changed = update_readme(README, speed_block(sections, command, seconds, link))
        print(f"bench: {'rewrote' if changed else 'kept'} the Speed section of {README}", file=sys.stderr)
    elif not args.quick:
        print(
            "bench: README.md's Speed section is rewritten only by a full run into bench/results",
            file=sys.stderr,
        )
    return 0


def run_section(
    name: str,
    run: Callable[[], list[Section]],
    max_runs: int,
    fits: Callable[[float], bool] = lambda seconds: True,
) -> list[Section]:
    """Runs a section, again while the machine was busy (up to max_runs in all, and only while
    `fits(seconds of the last run)` says another run fits the time left), and keeps the run on the
    quietest machine; each of its sections gets a note saying how busy the machine was."""
    runs: list[tuple[Load, list[Section]]] = []
    skipped_for_time = False
    while len(runs) < max_runs and (not runs or runs[-1][0].busy):
        if runs and not fits(runs[-1][0].seconds):
            skipped_for_time = True
            break
        with Meter() as meter:
            result = run()
        runs.append((meter.load, result))
        print(
            f"bench: {name} took {meter.load.seconds:.0f} s; {meter.load.note(1)}",
            file=sys.stderr,
            flush=True,
        )
    load, kept = min(runs, key=lambda run_: run_[0].other_cores)
    note = load.note(len(runs))
    if skipped_for_time:
        note += (
            f" Not run again: another {runs[-1][0].seconds:.0f} s would have taken the whole run past its "
            "time budget."
        )
    for section in kept:
        section.notes = [*section.notes, note]
    return kept


if __name__ == "__main__":
    sys.exit(main())

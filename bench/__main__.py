"""`python -m bench` (`make bench`): runs the sections, writes bench/results/REPORT.md and the plots."""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

from bench.report import Section, write_report

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
        section_started = time.monotonic()
        sections += module.run(args.out, args.quick)
        print(f"bench: {name} took {time.monotonic() - section_started:.0f} s", file=sys.stderr, flush=True)
    command = "make bench"
    if args.quick or args.sections != ",".join(SECTIONS):
        command = " ".join(
            ["python -m bench", *(["--quick"] if args.quick else []), f"--sections {args.sections}"]
        )
    report = write_report(sections, args.out / "REPORT.md", command, time.monotonic() - started)
    print(f"bench: wrote {report} in {(time.monotonic() - started) / 60:.1f} minutes", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

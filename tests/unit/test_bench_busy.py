"""bench.busy: a section measured while another process kept a core busy is seen as busy and run again,
and the quieter run is kept (real processes: a spinning child not yet waited for is someone else's load)."""

from __future__ import annotations

import subprocess
import sys
import time

from bench.__main__ import run_section
from bench.busy import BUSY_CORES, Meter
from bench.report import Section

SPIN = [sys.executable, "-c", "while True: pass"]


def test_another_process_spinning_is_seen_as_busy() -> None:
    spinner = subprocess.Popen(SPIN)
    try:
        with Meter() as meter:
            time.sleep(1.0)
    finally:
        spinner.kill()
        spinner.wait()
    assert meter.load.other_cores >= 0.5 and meter.load.busy, meter.load
    assert "busy" in meter.load.note(1) and f"{meter.load.other_cores:.2f} cores" in meter.load.note(1)


def test_a_busy_section_runs_again_and_the_quieter_run_is_kept() -> None:
    spinners: list[subprocess.Popen[bytes]] = []

    def run() -> list[Section]:
        if not spinners:  # the first run: a core kept busy by a process outside the benchmark
            spinners.append(subprocess.Popen(SPIN))
            time.sleep(1.0)
        else:  # the second: that process stopped (and waited for: its CPU time is the benchmark's own)
            spinners[0].kill()
            spinners[0].wait()
            time.sleep(0.2)
        return [Section(f"run {len(spinners) + (1 if spinners[0].poll() is not None else 0)}")]

    try:
        kept = run_section("test", run, max_runs=2)
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    assert [section.title for section in kept] == ["run 2"]
    assert "run 2 times, the quietest run kept" in kept[0].notes[-1]
    assert BUSY_CORES < 1.0

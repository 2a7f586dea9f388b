"""How busy the machine was while a section ran: the CPU time that processes outside the benchmark used.

A figure measured while something else ran on the machine is slower than the code it measures, and a ratio
against a floor measured at another moment is off. So each section is timed with `Meter`: the machine's
busy CPU time (all cores, from /proc/stat) over the section, less the benchmark's own (this process and
the children it has waited for: the services it started and stopped), per second of wall time, is the
number of cores that other processes kept busy. `python -m bench` prints it under each section and runs a
section again when it was above BUSY_CORES.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

BUSY_CORES = 0.25  # others' mean load, in cores, above which a section is measured again
_TICKS = os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
    """CPU seconds all cores have spent busy since boot (everything but idle and iowait), or NaN."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return float("nan")
    ticks = [int(v) for v in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    steal = ticks[7] if len(ticks) > 7 else 0  # another guest's time: not ours, not idle for us either
    return (sum(ticks[:8]) - idle - steal) / _TICKS


def own_cpu_s() -> float:
    """CPU seconds of this process and of its children that have been waited for."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


@dataclass(frozen=True)
class Load:
    """What a Meter saw: wall seconds, and the mean number of cores others kept busy."""

    seconds: float
    other_cores: float

    @property
    def busy(self) -> bool:
        return self.other_cores > BUSY_CORES

    def note(self, runs: int) -> str:
        again = (
            f"; run {runs} times, the quietest run kept (busy: above {BUSY_CORES} cores)" if runs > 1 else ""
        )
        verdict = "busy" if self.busy else "quiet"
        return (
            f"Machine while this ran: other processes kept {self.other_cores:.2f} cores busy on average over "
            f"{self.seconds:.0f} s ({verdict}{again})."
        )


class Meter:
    """`with Meter() as meter: ...` then `meter.load`."""

    def __enter__(self) -> Meter:
        self._wall = time.monotonic()
        self._machine = machine_busy_s()
        self._own = own_cpu_s()
        return self

    def __exit__(self, *exc: object) -> None:
        seconds = max(time.monotonic() - self._wall, 1e-9)
        others = (machine_busy_s() - self._machine) - (own_cpu_s() - self._own)
        self.load = Load(seconds, max(0.0, others) / seconds)

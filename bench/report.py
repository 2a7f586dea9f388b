"""Timing helpers, the machine's description and the Markdown report the benchmark writes."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class Figure:
    """One measured figure, with what it is compared against and the target it should meet."""

    name: str  # what was measured, e.g. "encoder service, one image, p50"
    value: float
    unit: str  # "ms", "images/s", "vectors/s", "bytes", "s", "MiB"
    reference: str = ""  # what it is compared against, e.g. "echo 3 KB + in-process decode + LiteRT"
    reference_value: float | None = None
    ratio: float | None = None  # value / reference_value (or as the target defines it)
    target: str = ""  # e.g. "ratio <= 1.3"
    met: bool | None = None  # None when there is no target
    note: str = ""  # why it was (not) met, or what to know


@dataclass
class Section:
    title: str
    figures: list[Figure] = field(default_factory=list)
    tables: list[tuple[str, str]] = field(default_factory=list)  # (caption, Markdown table)
    plots: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def samples_s(call: Callable[[], object], repeat: int, warmup: int = 3) -> np.ndarray:
    """Returns the wall time of each of `repeat` calls, in seconds, after `warmup` untimed calls."""
    for _ in range(warmup):
        call()
    times = np.empty(repeat)
    for n in range(repeat):
        started = time.perf_counter()
        call()
        times[n] = time.perf_counter() - started
    return times


def p50_p99_ms(times_s: np.ndarray) -> tuple[float, float]:
    return float(np.percentile(times_s, 50) * 1e3), float(np.percentile(times_s, 99) * 1e3)


def rss_mib(pid: int) -> float:
    """Returns a process's resident memory in MiB (from /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def machine_description() -> str:
    """Returns a few lines that say what machine and software the figures come from."""
    model = "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = ""
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        kib = int(meminfo.read_text().split("MemTotal:")[1].split()[0])
        memory = f", {kib / 1024 / 1024:.0f} GiB memory"
    versions = []
    for module in ("numpy", "faiss", "grpc", "ai_edge_litert", "tensorflow"):
        try:
            imported = __import__(module)
            versions.append(f"{module} {getattr(imported, '__version__', '?')}")
        except ImportError:
            pass
    return (
        f"- machine: {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable), {model}{memory}\n"
        f"- system: {platform.platform()}, Python {platform.python_version()}\n"
        f"- software: {', '.join(versions)}\n"
        f"- OpenBLAS settings: OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '-')}"
    )


def _cell(value: float | None, digits: int = 3) -> str:
    if value is None:
        return ""
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def figures_table(figures: list[Figure]) -> str:
    rows = [
        "| figure | value | reference | ratio | target | met | note |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for f in figures:
        reference = (
            f"{f.reference} ({_cell(f.reference_value)} {f.unit})"
            if f.reference_value is not None
            else f.reference
        )
        met = "" if f.met is None else ("yes" if f.met else "**no**")
        cells = [f.name, f"{_cell(f.value)} {f.unit}", reference, _cell(f.ratio), f.target, met, f.note]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def write_report(sections: list[Section], path: Path, command: str, seconds: float) -> Path:
    """Writes the Markdown report: the machine at the top, then each section's figures, tables, plots."""
    lines = [
        "# imgsearch benchmark",
        "",
        f"Made by `{command}` in {seconds / 60:.1f} minutes on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        machine_description(),
        "",
    ]
    for section in sections:
        lines += [f"## {section.title}", ""]
        lines += [*section.notes, ""] if section.notes else []
        if section.figures:
            lines += [figures_table(section.figures), ""]
        for caption, table in section.tables:
            lines += [f"**{caption}**", "", table, ""]
        for plot in section.plots:
            lines += [f"![{plot.stem}]({os.path.relpath(plot, path.parent)})", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path

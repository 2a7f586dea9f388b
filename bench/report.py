"""Timing helpers, the machine's description and the Markdown report the benchmark writes."""

from __future__ import annotations

import os
import platform
import re
import time
from collections.abc import Callable, Sequence
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
    headline: str = ""  # the key of the target (TARGETS) this figure is, or ""


@dataclass
class Section:
    title: str
    figures: list[Figure] = field(default_factory=list)
    tables: list[tuple[str, str]] = field(default_factory=list)  # (caption, Markdown table)
    plots: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # target key -> why it was not measured
    source: str = ""  # the section module it came from (set by `python -m bench`)


@dataclass(frozen=True)
class Target:
    """One target of issue 18: a key that figures name in `Figure.headline`, the issue's words, and the
    section (bench module) that measures it."""

    key: str
    what: str
    section: str


TARGETS = (
    Target("encoder-one", "encoder, one image: p50 <= 1.3x echo + decode + LiteRT", "encoder"),
    Target("search-by-image", "search by image at 60k: p50 < 4 ms", "e2e"),
    Target("batch-10k", "batched queries (1,000 a call) at 10k: >= 0.8 of echo + in-process FAISS", "index"),
    Target("batch-100k", "batched queries at 100k: >= 0.8 of echo + in-process FAISS", "index"),
    Target("batch-1M", "batched queries at 1M: >= 0.8 of echo + in-process FAISS", "index"),
    Target("one-1M", "one query at 1M: <= 0.6x one-thread FAISS", "index"),
    Target("one-1M-filtered", "one query at 1M, filtered (50 %): <= 0.6x one-thread FAISS", "index"),
    Target("writers", "8 concurrent single-vector writers: >= 4x one writer", "writers"),
    Target("memory-1M", "memory per stored vector at 1M: <= 1.3x raw vector + id", "index"),
    Target("filtered-1pct", "filtered search, 1 % selectivity, 100k: <= 0.2x unfiltered", "filters"),
    Target("collections", "a search in one of 10 collections: <= 1.1x a one-collection index", "collections"),
    Target("duplicates", "`duplicates` over 60k items: < 30 s", "duplicates"),
    Target("peer-milvus-lite", "peers at 100k: >= 10x faster than Milvus Lite", "peers"),
    Target("peer-qdrant", "peers at 100k: >= 10x faster than qdrant-client local", "peers"),
    Target("peer-milvus-server", "peers at 100k: >= 10x faster than the Milvus server", "peers"),
)


def samples_s(call: Callable[[], object], repeat: int, warmup: int = 3, rest_s: float = 0.0) -> np.ndarray:
    """Returns the wall time of each of `repeat` calls, in seconds, after `warmup` untimed calls; with
    `rest_s`, each call comes after that long asleep (untimed), as a service's calls come between idle
    spells."""
    for _ in range(warmup):
        call()
    times = np.empty(repeat)
    for n in range(repeat):
        if rest_s:
            time.sleep(rest_s)
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


def section_anchor(title: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


@dataclass(frozen=True)
class TargetRow:
    target: Target
    figure: Figure | None  # None: not measured in this run
    section: Section | None
    why_missing: str = ""


def target_rows(sections: Sequence[Section]) -> list[TargetRow]:
    """Every target of TARGETS, in order: a row for each figure that names it (`Figure.headline`), or one
    saying why it was not measured. A figure naming a key TARGETS lacks is a mistake: ValueError."""
    keys = {target.key for target in TARGETS}
    for section in sections:
        for figure in section.figures:
            if figure.headline and figure.headline not in keys:
                raise ValueError(f"figure {figure.name!r} names an unknown target {figure.headline!r}")
    rows: list[TargetRow] = []
    for target in TARGETS:
        found = [
            TargetRow(target, figure, section)
            for section in sections
            for figure in section.figures
            if figure.headline == target.key
        ]
        if found:
            rows += found
            continue
        why = next((s.skipped[target.key] for s in sections if target.key in s.skipped), "")
        if not why:
            ran = any(s.source == target.section for s in sections)
            why = "no figure for it" if ran else f"the {target.section} section did not run"
        rows.append(TargetRow(target, None, None, why))
    return rows


def targets_summary(rows: Sequence[TargetRow]) -> str:
    measured = [row for row in rows if row.figure is not None and row.figure.met is not None]
    met = sum(1 for row in measured if row.figure is not None and row.figure.met)
    missing = len(rows) - len(measured)
    return f"**{met} of {len(measured)} measured targets met**" + (
        f"; {missing} not measured in this run." if missing else "."
    )


def targets_table(rows: Sequence[TargetRow], report_link: str = "", compact: bool = False) -> str:
    """The targets as a Markdown table. `report_link` prefixes the section links (README: the report's
    path); `compact` leaves out the figure's own name (the README's shorter table)."""
    head = ["target (issue 18)", *([] if compact else ["measured"]), "value", "reference", "ratio"]
    head += ["target", "met", "section"]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    for row in rows:
        f, section = row.figure, row.section
        if f is None or section is None:
            cells = [
                row.target.what,
                *([] if compact else [""]),
                "",
                "",
                "",
                "",
                "not measured: " + row.why_missing,
            ]
            cells.append(row.target.section)
        else:
            reference = (
                f"{f.reference} ({_cell(f.reference_value)} {f.unit})"
                if f.reference_value is not None
                else f.reference
            )
            met = "" if f.met is None else ("yes" if f.met else "**no**")
            link = f"[{section.title.split(':')[0]}]({report_link}#{section_anchor(section.title)})"
            cells = [row.target.what, *([] if compact else [f.name]), f"{_cell(f.value)} {f.unit}", reference]
            cells += [_cell(f.ratio), f.target, met, link]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines)


def write_report(
    sections: list[Section], path: Path, command: str, seconds: float, run_notes: Sequence[str] = ()
) -> Path:
    """Writes the Markdown report: the machine at the top, the targets, then each section's figures,
    tables and plots."""
    lines = [
        "# imgsearch benchmark",
        "",
        f"Made by `{command}` in {seconds / 60:.1f} minutes on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        machine_description(),
        "",
        *([*run_notes, ""] if run_notes else []),
        "## Targets",
        "",
    ]
    rows = target_rows(sections)
    lines += [targets_summary(rows), "", targets_table(rows), ""]
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


# ---- the README's Speed section: rewritten from the same figures as the report -------------------

SPEED_BEGIN = "<!-- bench:speed:begin -->"
SPEED_END = "<!-- bench:speed:end -->"


def speed_block(sections: Sequence[Section], command: str, seconds: float, report_link: str) -> str:
    """The README's Speed section body: where the figures come from, the targets, a link to the report."""
    rows = target_rows(sections)
    cores = len(os.sched_getaffinity(0))
    return "\n".join(
        [
            f"`{command}` measures each service beside its in-process reference in one run and writes "
            f"[{report_link}]({report_link}) with plots. From the last run "
            f"({time.strftime('%Y-%m-%d', time.gmtime())}, {seconds / 60:.1f} minutes on {cores} cores; "
            "ratios are the service over its reference, except the peers': the peer over the service). "
            "This table is written by `python -m bench` from the figures of that report, so the two agree; "
            "the report says for each target how it was reached, or where the time or memory goes.",
            "",
            targets_summary(rows),
            "",
            targets_table(rows, report_link, compact=True),
        ]
    )


def replace_between_markers(text: str, block: str, begin: str = SPEED_BEGIN, end: str = SPEED_END) -> str:
    """The text with what lies between the two marker lines replaced by `block`; ValueError when the
    markers are missing, repeated or out of order. Replacing with the same block again changes nothing."""
    for marker in (begin, end):
        count = text.count(marker)
        if count != 1:
            raise ValueError(
                f"the README must hold the marker {marker} exactly once (it holds it {count} times): put "
                f"{begin} and {end} around the body of its Speed section"
            )
    start, stop = text.index(begin) + len(begin), text.index(end)
    if stop < start:
        raise ValueError(f"the README's {end} comes before its {begin}")
    return text[:start] + "\n" + block.strip("\n") + "\n" + text[stop:]


def update_readme(readme: Path, block: str) -> bool:
    """Rewrites the README's Speed section between its markers; returns whether the file changed."""
    text = readme.read_text()
    updated = replace_between_markers(text, block)
    if updated != text:
        readme.write_text(updated)
    return updated != text

"""The benchmark's targets table, the README's Speed section written from it, the time budget for second
runs, and the writers and collections reports. No timing is asserted: measured speed never goes in a test."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench import collections, report, writers
from bench.__main__ import EXPECTED_S, SECTIONS, main, run_section
from bench.busy import BUSY_CORES, Load
from bench.report import (
    SPEED_BEGIN,
    SPEED_END,
    TARGETS,
    Figure,
    Section,
    replace_between_markers,
    speed_block,
    target_rows,
    targets_table,
    update_readme,
)


def figure(key: str, met: bool, value: float = 1.0) -> Figure:
    return Figure(
        f"figure for {key}", value, "ms", "its reference", 2.0, value / 2, "ratio <= 1", met, headline=key
    )


def test_every_target_is_measured_by_a_section_that_runs() -> None:
    keys = [target.key for target in TARGETS]
    assert len(keys) == len(set(keys)) == 15
    assert {target.section for target in TARGETS} <= set(SECTIONS)
    assert set(EXPECTED_S) == set(SECTIONS)
    assert sum(EXPECTED_S.values()) <= 13 * 60, "the expected full run leaves no time for any second run"


def test_the_targets_table_has_one_row_per_target_and_says_what_is_missing() -> None:
    index = Section("Index: FAISS, the service", source="index")
    index.figures = [figure("batch-10k", True), figure("batch-100k", False), Figure("no target", 1.0, "ms")]
    peers = Section("Peers: others", source="peers", skipped={"peer-qdrant": "qdrant-client not installed"})
    peers.figures = [figure("peer-milvus-lite", True)]
    rows = target_rows([index, peers])
    assert [row.target.key for row in rows] == [target.key for target in TARGETS]
    by_key = {row.target.key: row for row in rows}
    assert by_key["batch-10k"].figure is not None and by_key["batch-10k"].section is index
    assert by_key["peer-qdrant"].why_missing == "qdrant-client not installed"
    assert by_key["encoder-one"].why_missing == "the encoder section did not run"
    assert by_key["batch-1M"].why_missing == "no figure for it"  # the index section ran without it
    table = targets_table(rows)
    lines = table.splitlines()
    assert len(lines) == 2 + len(TARGETS)
    assert "| yes | [Index](#index-faiss-the-service) |" in table
    assert "| **no** | [Index](#index-faiss-the-service) |" in table
    assert "not measured: qdrant-client not installed" in table
    assert "](bench/results/REPORT.md#peers-others) |" in targets_table(rows, "bench/results/REPORT.md")
    assert report.targets_summary(rows) == "**2 of 3 measured targets met**; 12 not measured in this run."


def test_a_figure_naming_an_unknown_target_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown target 'batch-2M'"):
        target_rows([Section("x", figures=[figure("batch-2M", True)])])


def test_the_report_puts_the_targets_after_the_machine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(report, "machine_description", lambda: "- machine: here")
    section = Section("Writers: many", figures=[figure("writers", True)], source="writers")
    text = report.write_report([section], tmp_path / "REPORT.md", "pytest", 60.0, ["a run note"]).read_text()
    assert text.index("- machine: here") < text.index("a run note") < text.index("## Targets")
    assert text.index("## Targets") < text.index("## Writers: many")
    assert "| 8 concurrent single-vector writers: >= 4x one writer | figure for writers | 1 ms |" in text


README = f"""# project

## Speed

{SPEED_BEGIN}
the old figures
{SPEED_END}

## Reliability
"""


def test_the_speed_section_is_rewritten_between_its_markers(tmp_path: Path) -> None:
    sections = [Section("Writers: many", figures=[figure("writers", False)], source="writers")]
    block = speed_block(sections, "make bench", 600.0, "bench/results/REPORT.md")
    assert "[bench/results/REPORT.md](bench/results/REPORT.md)" in block and "10.0 minutes" in block
    assert "](bench/results/REPORT.md#writers-many) |" in block and "| **no** |" in block
    readme = tmp_path / "README.md"
    readme.write_text(README)
    assert update_readme(readme, block) is True
    text = readme.read_text()
    assert "the old figures" not in text and block in text
    assert text.startswith("# project\n\n## Speed\n\n" + SPEED_BEGIN + "\n")
    assert text.endswith(SPEED_END + "\n\n## Reliability\n")
    assert update_readme(readme, block) is False and readme.read_text() == text, "idempotent"
    assert replace_between_markers(text, "other") == replace_between_markers(README, "other")


@pytest.mark.parametrize(
    "broken",
    [
        README.replace(SPEED_BEGIN, ""),
        README.replace(SPEED_END, ""),
        README.replace("# project", "# project\n" + SPEED_BEGIN),
    ],
    ids=["no begin", "no end", "begin twice"],
)
def test_missing_or_repeated_markers_are_a_clear_error(tmp_path: Path, broken: str) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(broken)
    with pytest.raises(ValueError, match="exactly once"):
        update_readme(readme, "block")
    assert readme.read_text() == broken, "left as it was"


def test_markers_out_of_order_are_a_clear_error() -> None:
    with pytest.raises(ValueError, match="comes before"):
        replace_between_markers(f"{SPEED_END}\n{SPEED_BEGIN}\n", "block")


def test_the_repository_readme_has_the_markers() -> None:
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert text.count(SPEED_BEGIN) == text.count(SPEED_END) == 1
    assert text.index("## Speed") < text.index(SPEED_BEGIN) < text.index(SPEED_END)


class FakeMeter:
    """Meter's stand-in: each run sees a busy machine (a little less busy each time) for 10 s."""

    runs = 0

    def __enter__(self) -> FakeMeter:
        return self

    def __exit__(self, *exc: object) -> None:
        FakeMeter.runs += 1
        self.load = Load(10.0, BUSY_CORES + 1 - FakeMeter.runs * 0.1)


def busy_section() -> list[Section]:
    return [Section(f"run {FakeMeter.runs + 1}")]


def test_a_busy_section_runs_again_only_when_it_fits_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("bench.__main__.Meter", FakeMeter)
    FakeMeter.runs = 0
    kept = run_section("test", busy_section, max_runs=2, fits=lambda seconds: seconds <= 5)
    assert FakeMeter.runs == 1 and [s.title for s in kept] == ["run 1"]
    assert (
        "Not run again: another 10 s would have taken the whole run past its time budget" in kept[0].notes[-1]
    )
    FakeMeter.runs = 0
    kept = run_section("test", busy_section, max_runs=2, fits=lambda seconds: True)
    assert FakeMeter.runs == 2 and [s.title for s in kept] == ["run 2"]
    assert "Not run again" not in kept[0].notes[-1]


def test_unknown_sections_are_refused() -> None:
    with pytest.raises(SystemExit):
        main(["--sections", "index,nonesuch", "--quick", "--out", "/nonexistent"])


def test_the_writers_report() -> None:
    def runs(rate: float) -> list[writers.Run]:
        return [writers.Run(1, int(rate), 1.0, np.full(10, 1e-3)) for _ in range(2)]

    by_count = {count: runs(500.0 * min(count, 5)) for count in writers.WRITERS}
    echoes = {1: runs(2000.0), 8: runs(4000.0)}
    section = writers.report(writers.QUICK, by_count, 1.0, "ext4", echoes, 560)
    (target,) = section.figures
    assert target.headline == "writers" and (target.value, target.reference_value) == (2500.0, 500.0)
    assert target.ratio == 5.0 and target.met is True and target.target == "ratio >= 4"
    assert "| 8 | 2,500 | 312 | 5.00 |" in section.tables[0][1]
    assert "| 8, bare echo (floor) | 4,000 calls/s | 500 | 2.00 |" in section.tables[0][1]
    assert "echo of the same payload scales 2.00x" in target.note and "560 bytes" in section.notes[-1]


def test_an_unmet_writers_target_below_the_echo_s_own_scaling_says_so() -> None:
    def runs(rate: float) -> list[writers.Run]:
        return [writers.Run(1, int(rate), 1.0, np.full(10, 1e-3)) for _ in range(2)]

    by_count = {count: runs(500.0 + 100.0 * count) for count in writers.WRITERS}
    slow_floor = writers.report(writers.QUICK, by_count, 1.0, "ext4", {1: runs(2e3), 8: runs(4e3)}, 560)
    assert slow_floor.figures[0].met is False
    assert "more than the echo itself scales to here (1,200 at its ratio)" in slow_floor.figures[0].note
    fast_floor = writers.report(writers.QUICK, by_count, 1.0, "ext4", {1: runs(2e3), 8: runs(9e3)}, 560)
    assert "group commit" in fast_floor.figures[0].note


def test_the_collections_report() -> None:
    plan = collections.QUICK
    times = {}
    for size in plan.measured:
        times[f"many-{size}"] = np.full(10, 1.2e-3)
        times[f"alone-{size}"] = np.full(10, 1e-3)
    section = collections.report(plan, collections.Measured(times, 1.0, 100.0))
    (target,) = section.figures
    assert target.headline == "collections" and target.target == "ratio <= 1.1"
    assert target.ratio is not None and abs(target.ratio - 1.2) < 1e-9 and target.met is False
    assert len(plan.sizes) == 10 and plan.headline in plan.measured
    assert collections.NORMAL.headline in collections.NORMAL.measured and len(collections.NORMAL.sizes) == 10


def test_only_a_full_run_into_bench_results_rewrites_the_readme(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys
    import types

    import bench.__main__ as entry

    fake = types.ModuleType("bench.fake")
    fake.run = lambda out, quick: [Section("Fake: it", figures=[figure("writers", True)])]  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "bench.fake", fake)
    monkeypatch.setattr(entry, "SECTIONS", ["fake"])
    monkeypatch.setattr(entry, "README", tmp_path / "README.md")
    monkeypatch.setattr(report, "machine_description", lambda: "- machine: here")
    (tmp_path / "README.md").write_text(README)
    out = tmp_path / "bench" / "results"
    assert main(["--quick", "--out", str(out)]) == 0
    assert "the old figures" in (tmp_path / "README.md").read_text(), "--quick leaves the README"
    assert main(["--out", str(tmp_path / "elsewhere")]) == 0
    assert "the old figures" in (tmp_path / "README.md").read_text(), "another --out leaves it"
    assert main(["--out", str(out)]) == 0
    text = (tmp_path / "README.md").read_text()
    assert "the old figures" not in text and "(bench/results/REPORT.md#fake-it)" in text
    assert "Made by `make bench`" in (out / "REPORT.md").read_text()

"""The CLI's rough edges, each fixed: `search -` (an image on stdin), a reader of stdout that goes away,
counts in the right number, eval's warnings, the skipped files' paths, long ids in `show`'s picture.

Both services run in process; the CLI runs in process (capsys) where that is enough, as a child process
where stdin or a broken pipe is the point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from encoder_service.service import EncoderService
from imgsearch import cli
from imgsearch.cli import main, plural
from imgsearch.convert import Match
from imgsearch.evaluate import self_matches, unmatched_labels
from index_service.service import IndexService
from tests.support import ROOT, address, mnist_sample, png, serve, start_encoder, start_index, write_digits

INDEXED = 200


@pytest.fixture(scope="module")
def encoder() -> Iterator[EncoderService]:
    yield from serve(start_encoder())


@pytest.fixture(scope="module")
def indexed(tmp_path_factory: pytest.TempPathFactory, encoder: EncoderService) -> Iterator[tuple[str, Path]]:
    """An index of INDEXED sample digits (ids `<label>/<number>.png`): (its address, the folder)."""
    root = tmp_path_factory.mktemp("papercuts")
    folder = write_digits(root / "db", INDEXED)
    index = start_index(root / "index")
    try:
        code = main(
            ["--encoder", address(encoder), "--index", address(index), "index", str(folder), "--no-progress"]
        )
        assert code == 0
        yield address(index), folder
    finally:
        index.stop(0)


@pytest.fixture
def fresh_index(tmp_path: Path) -> Iterator[IndexService]:
    yield from serve(start_index(tmp_path / "index"))


def imgsearch(
    encoder: str, index: str, *args: str, stdin: bytes | None = None, stdout: Any = subprocess.PIPE
) -> subprocess.CompletedProcess[bytes]:
    """The CLI as a child process, as a shell runs it (stdin from `stdin`, else /dev/null)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGSEARCH_")}
    return subprocess.run(
        [sys.executable, "-m", "imgsearch", "--encoder", encoder, "--index", index, *args],
        input=stdin if stdin is not None else b"",
        stdout=stdout,
        stderr=subprocess.PIPE,
        env=env,
        cwd=ROOT,
        timeout=120,
    )


# ---- `imgsearch search -`


def test_search_dash_reads_one_image_from_stdin(encoder: EncoderService, indexed: tuple[str, Path]) -> None:
    index, folder = indexed
    own = sorted((folder / "3").glob("*.png"))[0]
    result = imgsearch(address(encoder), index, "search", "-", "-k", "4", "--json", stdin=own.read_bytes())
    assert result.returncode == 0, result.stderr.decode()
    answer = json.loads(result.stdout)
    assert answer["query"] == "-" and len(answer["results"]) == 4
    top = answer["results"][0]
    assert top["id"] == f"3/{own.name}" and top["distance"] < 1e-5

    table = imgsearch(address(encoder), index, "search", "-", "-k", "2", stdin=own.read_bytes())
    assert table.returncode == 0 and f"3/{own.name}" in table.stdout.decode()
    assert table.stdout.decode().splitlines()[0] == "-"


def test_search_dash_with_empty_or_bad_stdin_says_so(
    encoder: EncoderService, indexed: tuple[str, Path]
) -> None:
    index, _ = indexed
    empty = imgsearch(address(encoder), index, "search", "-", stdin=b"")
    assert empty.returncode == 2 and empty.stdout == b""
    assert (
        empty.stderr.decode().strip() == "imgsearch search: - reads an image from stdin, but stdin was empty"
    )

    bad = imgsearch(address(encoder), index, "search", "-", "--json", stdin=b"hello, not an image")
    assert bad.returncode == 2 and bad.stdout == b""
    (line,) = bad.stderr.decode().strip().splitlines()  # one line, no traceback
    assert "encoder service" in line and "INVALID_ARGUMENT" in line and "cannot decode" in line

    mixed = imgsearch(address(encoder), index, "search", "-", str(ROOT / "README.md"), stdin=b"x")
    assert mixed.returncode == 2 and "give it alone" in mixed.stderr.decode()


def test_search_help_tells_of_stdin(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["search", "--help"])
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "- alone reads one image" in text and "imgsearch search - < photo.jpg" in text


# ---- a reader of stdout that goes away: `imgsearch stats | head -1`


def test_a_closed_stdout_ends_quietly(encoder: EncoderService, indexed: tuple[str, Path]) -> None:
    """Each command whose reader goes away (`imgsearch stats | head -1`): no "Broken pipe", no "Exception
    ignored ... BrokenPipeError", and the exit code a command ended by SIGPIPE gives."""
    index, folder = indexed
    stored = sorted(folder.rglob("*.png"))[0].relative_to(folder).as_posix()
    for args in (["stats"], ["info"], ["search", "--id", stored, "-k", "50", "--json"]):
        read, write = os.pipe()
        os.close(read)  # nobody reads: the first write (the flush) gets EPIPE
        try:
            result = imgsearch(address(encoder), index, *args, stdout=write)
        finally:
            os.close(write)
        assert result.returncode == cli.SIGPIPE_EXIT == 141, (args, result.stderr.decode())
        assert result.stderr.decode() == "", args


# ---- counts in the right number


def test_counts_take_the_right_number(
    encoder: EncoderService, fresh_index: IndexService, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert [plural(n, "image") for n in (0, 1, 2)] == ["0 images", "1 image", "2 images"]
    assert plural(1, "query", "queries") == "1 query" and plural(3, "query", "queries") == "3 queries"
    x, _ = mnist_sample(2)
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "a.png").write_bytes(png(x[0]))
    (tmp_path / "one" / "notes.txt").write_text("not an image")
    flags = ["--encoder", address(encoder), "--index", address(fresh_index)]

    assert main([*flags, "index", str(tmp_path / "one"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "indexed 1 image; the index now holds 1\n" in out and "skipped 1 file:\n" in out

    assert main([*flags, "index", str(tmp_path / "one"), "--resume", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "resuming: 1 of 1 image is already in the index\n" in out
    assert "indexed 0 images; the index now holds 1\n" in out

    (tmp_path / "one" / "b.png").write_bytes(png(x[1]))
    assert main([*flags, "index", str(tmp_path / "one"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "indexed 2 images; the index now holds 2\n" in out and "skipped 1 file:\n" in out


# ---- eval's warnings


def write_queries(folder: Path, labels: list[str], start: int = 9000, per_label: int = 3) -> Path:
    """Sample digits (not indexed) in subfolders named by `labels`, whatever digits they show."""
    x, _ = mnist_sample(len(labels) * per_label, start)
    for n, digit in enumerate(x):
        path = folder / labels[n // per_label] / f"q{n:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(digit).save(path)
    return folder


def run_eval(encoder: EncoderService, index: str, folder: Path, capsys: pytest.CaptureFixture[str]) -> str:
    code = main(
        ["--encoder", address(encoder), "--index", index, "eval", str(folder), "--json", "--no-progress"]
    )
    captured = capsys.readouterr()
    assert code == 0 and json.loads(captured.out)["queries"] > 0
    return " ".join(captured.err.split())


def test_eval_warns_of_query_labels_no_result_carries(
    encoder: EncoderService, indexed: tuple[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    index, _ = indexed
    none_known = run_eval(encoder, index, write_queries(tmp_path / "animals", ["cat", "dog"]), capsys)
    assert "warning: no result carries any of the queries' labels ('cat', 'dog'), so every figure is 0" in (
        none_known
    )
    assert "name the subfolders by the labels the index was built with" in none_known

    y = mnist_sample(3, 9000)[1]  # the first label's queries show digits of these labels
    some = run_eval(encoder, index, write_queries(tmp_path / "mixed", [str(y[0]), "zebra"]), capsys)
    assert "no result carries the 1 label 'zebra', so those classes score 0" in some
    assert "any of" not in some


def test_eval_of_an_empty_index_says_it_found_nothing(
    encoder: EncoderService, fresh_index: IndexService, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    said = run_eval(encoder, address(fresh_index), write_digits(tmp_path / "q", 10, start=8000), capsys)
    assert "so every figure is 0; the index returned no results at all (is it empty?)" in said


def test_eval_warns_when_the_queries_are_in_the_index(
    encoder: EncoderService, indexed: tuple[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    index, folder = indexed
    itself = run_eval(encoder, index, folder, capsys)
    assert "warning: every query is already in the index" in itself and "self-matches" in itself

    unseen = run_eval(encoder, index, write_digits(tmp_path / "unseen", 40, start=8000), capsys)
    assert unseen == "", unseen  # fair queries: no warning at all

    assert self_matches(["a", "b", "c"], [("a", 0.7), ("x", 0.0), None]) == 2
    assert unmatched_labels(["1", "2", "3"], [["1", "1"], [], ["4"]]) == ["2", "3"]


# ---- the skipped files' paths


def test_the_skipped_files_are_all_named_by_absolute_path(
    encoder: EncoderService,
    fresh_index: IndexService,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Files skipped when listed (not an image, an id taken), when read, and when the encoder refuses them:
    one form, absolute, however the folder was given (here relative to the working directory)."""
    write_digits(tmp_path / "photos", 3)
    (tmp_path / "photos" / "notes.txt").write_text("not an image")
    (tmp_path / "photos" / "broken.png").write_bytes(b"not a png")
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "broken.png").write_bytes(png(mnist_sample(1)[0][0]))  # its id is taken
    monkeypatch.chdir(tmp_path)
    flags = ["--encoder", address(encoder), "--index", address(fresh_index)]
    assert main([*flags, "index", "photos", "more", "missing", "--no-progress"]) == 0
    out = capsys.readouterr().out
    listing = out.split("skipped 4 files:\n", 1)[1].splitlines()
    paths = [line.strip().split(": ", 1)[0] for line in listing]
    assert sorted(paths) == sorted(
        str(tmp_path / name)
        for name in ("photos/notes.txt", "photos/broken.png", "more/broken.png", "missing")
    ), out
    assert all(Path(path).is_absolute() for path in paths)


# ---- long ids in `show`'s picture


def test_show_ellipsizes_long_ids_so_titles_never_overlap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Titles (id, distance) of a row lie side by side without overlapping, within the picture, however
    long the ids (wide letters, `$` that mathtext would eat); a short id is shown whole."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.transforms import Bbox

    from imgsearch.show import draw_similar

    drawn: list[tuple[list[str], list[Bbox], float]] = []  # each picture's titles, their boxes, its width
    save = Figure.savefig

    def keep(figure: Figure, *args: Any, **kwargs: Any) -> None:
        save(figure, *args, **kwargs)
        renderer = figure.canvas.get_renderer()  # type: ignore[attr-defined]
        titles = [axis.title for axis in figure.axes if axis.get_title()]
        boxes = [title.get_window_extent(renderer) for title in titles]
        drawn.append(([title.get_text() for title in titles], boxes, figure.bbox.width))

    monkeypatch.setattr(Figure, "savefig", keep)
    x, _ = mnist_sample(1)
    long_ids = ["W" * 200, "a$b$" + "m" * 196, "photos/" + "x" * 180 + "/cat.png"]
    matches = [Match(i, 0.5 + n, {}) for n, i in enumerate(long_ids)] + [Match("3/00001.png", 0.9, {})]
    draw_similar([("q" * 250 + ".png", png(x[0]))], [matches], tmp_path / "grid.png")
    ((texts, boxes, width),) = drawn
    assert len(texts) == 5
    boxes = sorted(boxes, key=lambda box: box.x0)
    for left, right in pairwise(boxes):
        assert left.x1 < right.x0, (left, right)
    assert boxes[0].x0 >= 0 and boxes[-1].x1 <= width
    assert texts[-1] == "3/00001.png\nd=0.900"
    assert texts[1].startswith("WWW") and "\u2026" in texts[1] and texts[1].endswith("\nd=0.500")
    assert texts[2].startswith("a$b$mm") and "\u2026" in texts[2]
    assert texts[3].startswith("photos/xx") and texts[3].split("\n")[0].endswith("/cat.png")
    assert texts[0].startswith("query\nqqq") and texts[0].endswith(".png")

"""The CLI's search tools through the real services (FAISS): `search --filter/--max-distance` by image and
by id, `list`, `export`/`import`, `index --id-prefix/--meta` and its collision warning, and `duplicates`."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from encoder_service.model_dir import CARD_JSON, DEFAULT_MODEL_DIR, ENCODER_TFLITE
from encoder_service.service import EncoderService
from imgsearch.cli import main
from imgsearch.client import ImageSearch, IndexClient
from index_service.service import IndexService
from tests.support import address, serve, start_encoder, start_index, write_digits

Cli = Callable[..., tuple[int, str, str]]
DUPLICATE_DISTANCE = 0.25  # the card of the model `carded` gives it


def model_copy(folder: Path, card: dict[str, object]) -> Path:
    """The default model's encoder under another card: a model whose card says what a test needs."""
    folder.mkdir(parents=True)
    (folder / ENCODER_TFLITE).symlink_to(DEFAULT_MODEL_DIR / ENCODER_TFLITE)
    (folder / CARD_JSON).write_text(json.dumps(card))
    return folder


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EncoderService]:
    models = tmp_path_factory.mktemp("models")
    card = json.loads((DEFAULT_MODEL_DIR / CARD_JSON).read_text())
    card.pop("duplicate_distance", None)
    carded = model_copy(models / "carded", {**card, "duplicate_distance": DUPLICATE_DISTANCE})
    bare = model_copy(models / "bare", card)
    yield from serve(start_encoder("--models", f"default,carded={carded},bare={bare}"))


def make_cli(capsys: pytest.CaptureFixture[str], encoder: EncoderService, index: IndexService) -> Cli:
    def cli(*args: str) -> tuple[int, str, str]:
        code = main(["--encoder", address(encoder), "--index", address(index), *args])
        out, err = capsys.readouterr()
        return code, out, err

    return cli


def jsonl(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# ---- one index of two albums for the search and list tests: A/<label>/<n>.png and B/<label>/<n>.png


@pytest.fixture(scope="module")
def albums(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("albums")
    return {
        "A": write_digits(root / "A", 30),
        "B": write_digits(root / "B", 30, start=30),
        "queries": write_digits(root / "queries", 3, start=500),
    }


@pytest.fixture(scope="module")
def stocked(
    tmp_path_factory: pytest.TempPathFactory, encoder: EncoderService, albums: dict[str, Path]
) -> Iterator[IndexService]:
    """An index holding album A (ids A/..., metadata album=A) and album B (ids B/..., album=B)."""
    service = start_index(tmp_path_factory.mktemp("stocked"))
    try:
        for name in ("A", "B"):
            flags = ["--id-prefix", f"{name}/", "--meta", f"album={name}", "--meta", "shelf=1"]
            called = ["--encoder", address(encoder), "--index", address(service), "index", str(albums[name])]
            assert main([*called, *flags, "--no-progress"]) == 0
        yield service
    finally:
        service.stop(0)


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], encoder: EncoderService, stocked: IndexService) -> Cli:
    capsys.readouterr()
    return make_cli(capsys, encoder, stocked)


def queries_of(albums: dict[str, Path]) -> list[str]:
    return sorted(str(p) for p in albums["queries"].rglob("*.png"))


def unfiltered(cli: Cli, *query: str) -> list[list[dict[str, Any]]]:
    """Every stored item for each query, nearest first: the reference a filtered search is checked on."""
    code, out, err = cli("search", *query, "-k", "60", "--json")
    assert code == 0, err
    return [row["results"] for row in jsonl(out)]


# --filter texts ({A}: album A's folder) and what they keep of an item's metadata (and album A's folder)
FILTERS: list[tuple[list[str], Callable[[dict[str, str], str], bool]]] = [
    (["label=3"], lambda m, _: m["label"] == "3"),
    (["label=3", "label=5"], lambda m, _: m["label"] in ("3", "5")),
    (["album!=A"], lambda m, _: m["album"] != "A"),
    (["source^={A}/3/"], lambda m, a: m["source"].startswith(f"{a}/3/")),
    (["album=B", "label=7"], lambda m, _: m["album"] == "B" and m["label"] == "7"),
    (["album=B", "label!=7", "label!=1"], lambda m, _: m["album"] == "B" and m["label"] not in ("7", "1")),
]


@pytest.mark.parametrize(("filters", "keeps"), FILTERS, ids=[" ".join(f) for f, _ in FILTERS])
def test_search_filters_keep_exactly_the_nearest_matching(
    cli: Cli, albums: dict[str, Path], filters: list[str], keeps: Callable[[dict[str, str], str], bool]
) -> None:
    queries = queries_of(albums)
    reference = unfiltered(cli, *queries)
    flags = [word for text in filters for word in ("--filter", text.format(A=albums["A"]))]
    code, out, err = cli("search", *queries, "-k", "4", "--json", *flags)
    assert code == 0, err
    rows = jsonl(out)
    assert [row["query"] for row in rows] == queries
    for row, everything in zip(rows, reference, strict=True):
        expected = [m["id"] for m in everything if keeps(m["metadata"], str(albums["A"]))][:4]
        assert [m["id"] for m in row["results"]] == expected and expected


def test_search_filter_agrees_with_brute_force(
    cli: Cli, albums: dict[str, Path], encoder: EncoderService, stocked: IndexService
) -> None:
    """A filtered search against numpy over every stored vector (IndexClient.get)."""
    query = queries_of(albums)[0]
    with closing(IndexClient(address(stocked))) as index:
        ids = [i for page in index.scan() for i in page.ids]
        items, _ = index.get(ids, with_vectors=True)
    vectors = {item.id: item.vector for item in items}
    kept = [
        item.id for item in items if item.metadata["label"] in ("2", "4") and item.metadata["album"] == "A"
    ]
    with ImageSearch(address(encoder), address(stocked)) as search:
        vector = search.encoder.embed([Path(query).read_bytes()]).vectors[0]
    distances = {i: float(np.linalg.norm(vectors[i] - vector)) for i in kept}
    expected = sorted(kept, key=distances.__getitem__)[:3]
    code, out, err = cli(
        "search",
        query,
        "-k",
        "3",
        "--json",
        "--filter",
        "label=2",
        "--filter",
        "label=4",
        "--filter",
        "album=A",
    )
    assert code == 0, err
    found = jsonl(out)[0]["results"]
    assert [m["id"] for m in found] == expected
    assert [m["distance"] for m in found] == pytest.approx([distances[i] for i in expected], abs=1e-4)
    assert len(expected) == 3


def test_max_distance_keeps_a_result_at_exactly_d(cli: Cli, albums: dict[str, Path]) -> None:
    query = queries_of(albums)[1]
    everything = unfiltered(cli, query)[0]
    third = everything[2]["distance"]
    code, out, err = cli("search", query, "-k", "10", "--json", "--max-distance", repr(third))
    assert code == 0, err
    found = jsonl(out)[0]["results"]
    assert [m["id"] for m in found] == [m["id"] for m in everything[:3]]
    assert found[-1]["distance"] == third
    # with a filter too: the nearest matching within D
    limit = everything[20]["distance"]
    code, out, _ = cli(
        "search", query, "-k", "60", "--json", "--max-distance", repr(limit), "--filter", "album=B"
    )
    expected = [m["id"] for m in everything[:21] if m["metadata"]["album"] == "B"]
    assert [m["id"] for m in jsonl(out)[0]["results"]] == expected
    # nothing within D: said in the table, [] in JSON
    code, out, _ = cli("search", query, "--max-distance", "0.001")
    assert code == 0 and out.splitlines() == [query, "  no result within 0.001"], out
    code, out, _ = cli("search", query, "--max-distance", "0.001", "--filter", "label=3", "--json")
    [row] = jsonl(out)
    assert code == 0 and row == {"query": query, "novelty": row["novelty"], "results": []}
    assert 0 <= row["novelty"] < 1, "a digit, as the model knows them"
    code, out, _ = cli("search", query, "--filter", "album=C")
    assert code == 0 and out.splitlines() == [query, "  no result matching --filter album=C"], out


def test_search_by_id_takes_a_filter_and_a_max_distance(cli: Cli) -> None:
    code, out, _ = cli("search", "--id", "A/3/00007.png", "-k", "60", "--json")
    everything = jsonl(out)[0]["results"]
    assert len(everything) == 59
    code, out, err = cli("search", "--id", "A/3/00007.png", "-k", "5", "--json", "--filter", "album=B")
    assert code == 0, err
    expected = [m["id"] for m in everything if m["metadata"]["album"] == "B"][:5]
    assert [m["id"] for m in jsonl(out)[0]["results"]] == expected
    limit = everything[4]["distance"]
    code, out, _ = cli(
        "search",
        "--id",
        "A/3/00007.png",
        "-k",
        "60",
        "--json",
        "--max-distance",
        repr(limit),
        "--filter",
        "shelf=1",
    )
    assert [m["id"] for m in jsonl(out)[0]["results"]] == [m["id"] for m in everything[:5]]
    code, out, _ = cli("search", "--id", "A/3/00007.png", "--max-distance", "0")
    assert out.splitlines() == ["A/3/00007.png", "  no result within 0.0"], out


@pytest.mark.parametrize("text", ["label", "=3", "!=3", "^=x"])
def test_a_bad_filter_is_one_line_and_exit_2(cli: Cli, text: str) -> None:
    code, out, err = cli("search", "--id", "A/3/00007.png", "--filter", text)
    assert code == 2 and not out and len(err.strip().splitlines()) == 1, err
    assert err.startswith("imgsearch search: --filter"), err


def test_list_streams_every_item_with_its_metadata(cli: Cli, albums: dict[str, Path]) -> None:
    code, out, err = cli("list", "--page-size", "7")
    lines = out.splitlines()
    assert code == 0 and lines[-1] == "60 items in the index", (lines[-3:], err)
    first = next(line for line in lines if line.startswith("A/3/00007.png "))
    novelty = first.split("novelty=")[1].split()[0]  # the model's, stored by `index`
    source = albums["A"] / "3" / "00007.png"
    assert first == f"A/3/00007.png  album=A  label=3  novelty={novelty}  shelf=1  source={source}"
    assert 0 <= float(novelty) < 1.5 and novelty == f"{float(novelty):.2f}"
    assert sorted(line.split()[0] for line in lines[:-1]) == sorted(
        [f"A/{p.relative_to(albums['A']).as_posix()}" for p in albums["A"].rglob("*.png")]
        + [f"B/{p.relative_to(albums['B']).as_posix()}" for p in albums["B"].rglob("*.png")]
    )
    code, out, _ = cli("list", "--filter", "album=B", "--filter", "label=7", "--json")
    listed = jsonl(out)
    expected = sorted(f"B/7/{p.name}" for p in (albums["B"] / "7").glob("*.png"))
    assert code == 0 and sorted(item["id"] for item in listed) == expected
    assert all(set(item) == {"id", "metadata"} for item in listed)
    assert (
        listed[0]["metadata"]
        == {
            "album": "B",
            "label": "7",
            "novelty": listed[0]["metadata"]["novelty"],  # the model's, stored by `index`
            "shelf": "1",
            "source": str(albums["B"] / str(listed[0]["id"])[2:]),
        }
    )
    code, out, _ = cli("list", "--filter", "album=B", "--filter", "label=7")
    assert (
        out.splitlines()[-1]
        == f"{len(expected)} items matching --filter album=B --filter label=7, of 60 in the index"
    )
    code, out, _ = cli("list", "--filter", "album=C")
    assert out.splitlines() == ["0 items matching --filter album=C, of 60 in the index"]


# ---- export and import


def test_export_then_import_gives_the_same_search_results(
    cli: Cli, albums: dict[str, Path], tmp_path: Path, stocked: IndexService
) -> None:
    saved = tmp_path / "all.npz"
    code, out, err = cli("export", str(saved), "--no-progress", "--page-size", "16")
    assert code == 0 and "exported 60 items (model default" in out and str(saved) in out, (out, err)
    with np.load(saved, allow_pickle=False) as data:
        assert {"ids", "vectors", "metadata", "model_version", "model_name", "collection", "dim"} <= set(
            data.files
        )
        ids, vectors, metadata = data["ids"], data["vectors"], data["metadata"]
        assert ids.dtype.kind == "U" and ids.shape == (60,)
        assert vectors.dtype == np.float32 and vectors.shape == (60, int(data["dim"]))
        assert metadata.dtype.kind == "U" and metadata.shape == (60,)
        assert data["model_version"].shape == () and data["model_version"].dtype.kind == "U"
        version, name = str(data["model_version"]), str(data["model_name"])
    with closing(IndexClient(address(stocked))) as index:
        stats = index.stats()
        items, _ = index.get(ids.tolist(), with_vectors=True)
    assert (version, name) == (stats.model_version, stats.model_name) == (stats.model_version, "default")
    assert [json.loads(m) for m in metadata] == [item.metadata for item in items]
    np.testing.assert_array_equal(
        vectors, np.stack([item.vector for item in items if item.vector is not None])
    )
    code, out, err = cli("import", str(saved), "--collection", "copy", "--no-progress", "--batch-size", "25")
    assert code == 0 and "created the collection 'copy' (model 'default')" in err, err
    assert "imported 60 items" in out and "the collection 'copy', which now holds 60" in out, out
    code, out, _ = cli("stats", "--collection", "copy", "--json")
    copied = json.loads(out)
    assert (copied["model_version"], copied["model_name"], copied["count"]) == (version, "default", 60)
    queries = queries_of(albums)
    before = cli("search", *queries, "-k", "8", "--json", "--filter", "label!=2")[1]
    after = cli("search", *queries, "-k", "8", "--json", "--filter", "label!=2", "--collection", "copy")[1]
    assert jsonl(before) == jsonl(after) and len(jsonl(before)) == 3
    # a filtered export holds those items only; importing it again replaces them, adding none
    part = tmp_path / "part.npz"
    code, out, _ = cli("export", str(part), "--filter", "album=A", "--no-progress")
    assert code == 0 and "exported 30 items" in out
    code, out, err = cli("import", str(part), "--collection", "copy", "--no-progress")
    assert code == 0 and "which now holds 60" in out and "already holds 60 items" in err, (out, err)
    cli("collections", "drop", "copy")


def test_import_refuses_another_model_version_or_dim_and_a_bad_file(
    cli: Cli, tmp_path: Path, stocked: IndexService
) -> None:
    saved = tmp_path / "all.npz"
    assert cli("export", str(saved), "--no-progress")[0] == 0
    with closing(IndexClient(address(stocked))) as index:
        index.create_collection("elsewhere")
        index.upsert(["x"], np.ones((1, 8), np.float32), (), "other-v1", collection="elsewhere")
    code, out, err = cli("import", str(saved), "--collection", "elsewhere", "--no-progress")
    assert (
        code == 2
        and not out
        and err.startswith("imgsearch import: the collection 'elsewhere' holds 1 vector")
    ), err
    assert "model version 'other-v1', dim 8" in err and len(err.strip().splitlines()) == 1
    odd = tmp_path / "odd.npz"
    np.savez(odd, ids=np.array(["a"]), vectors=np.ones((1, 8), np.float32))
    code, _, err = cli("import", str(odd), "--collection", "fresh", "--no-progress")
    assert code == 2 and "lacks metadata, model_version" in err, err
    code, _, err = cli("import", str(tmp_path / "none.npz"), "--collection", "fresh", "--no-progress")
    assert code == 2 and "cannot be read" in err, err
    with closing(IndexClient(address(stocked))) as index:
        assert "fresh" not in [c.name for c in index.list_collections()]
        index.drop_collection("elsewhere")


# ---- index: --id-prefix, --meta and the collision warning


@pytest.fixture
def fresh(capsys: pytest.CaptureFixture[str], encoder: EncoderService, index_service: IndexService) -> Cli:
    return make_cli(capsys, encoder, index_service)


def test_index_meta_is_checked_and_wins_over_label(fresh: Cli, tmp_path: Path) -> None:
    folder = write_digits(tmp_path / "few", 4)
    for bad, said in (
        ("source=/x", "`source` is always the image's own path"),
        ("=v", "key before '=' is empty"),
        ("k", "expected KEY=VALUE"),
    ):
        code, out, err = fresh("index", str(folder), "--meta", bad, "--no-progress")
        assert code == 2 and not out and len(err.strip().splitlines()) == 1, err
        assert err.startswith(f"imgsearch index: --meta {bad!r}: ") and said in err, err
    code, out, err = fresh(
        "index", str(folder), "--meta", "label=digit", "--meta", "k=1", "--meta", "k=2", "--id-prefix", "p:"
    )
    assert code == 0 and "now holds 4" in out, err
    listed = jsonl(fresh("list", "--json")[1])
    assert all(
        i["id"].startswith("p:") and i["metadata"]["label"] == "digit" and i["metadata"]["k"] == "2"
        for i in listed
    )
    assert {i["metadata"]["source"] for i in listed} == {str(p) for p in folder.rglob("*.png")}


def test_indexing_two_folders_of_the_same_paths_warns_and_id_prefix_keeps_both(
    fresh: Cli, tmp_path: Path
) -> None:
    one = write_digits(tmp_path / "albumA" / "trip", 8).parent
    two = tmp_path / "albumB"
    shutil.copytree(one, two)
    code, out, err = fresh("index", str(one), "--no-progress", "--batch-size", "3")
    assert code == 0 and "warning" not in out, (out, err)
    code, out, err = fresh("index", str(one), "--no-progress")  # the same files again: the same sources
    assert code == 0 and "warning" not in out, (out, err)
    code, out, err = fresh("index", str(two), "--no-progress", "--batch-size", "3", "--in-flight", "2")
    ids = sorted(f"trip/{p.relative_to(two / 'trip').as_posix()}" for p in two.rglob("*.png"))
    assert code == 0 and "now holds 8" in out, (out, err)
    warning = next(line for line in out.splitlines() if line.startswith("warning:"))
    named = ", ".join(f"{i} (was {one / i})" for i in ids[:5])
    assert warning == (
        "warning: replaced 8 items whose source was another file (ids collide; --id-prefix keeps folders "
        f"apart): {named} and 3 more"
    )
    assert fresh("collections", "create", "apart")[0] == 0
    for folder in (one, two):
        code, out, err = fresh(
            "index", str(folder), "--id-prefix", f"{folder.name}/", "--collection", "apart", "--no-progress"
        )
        assert code == 0 and "warning" not in out, (out, err)
    code, out, _ = fresh("list", "--collection", "apart", "--json")
    assert sorted(i["id"] for i in jsonl(out)) == sorted(
        [f"albumA/{i}" for i in ids] + [f"albumB/{i}" for i in ids]
    )
    code, out, _ = fresh(
        "index", str(two), "--id-prefix", "albumB/", "--collection", "apart", "--resume", "--no-progress"
    )
    assert (
        code == 0 and "resuming: 8 of 8 images are already in the index" in out and "indexed 0 images" in out
    ), out


# ---- duplicates


def test_duplicates_finds_the_planted_copies(fresh: Cli, tmp_path: Path) -> None:
    folder = write_digits(tmp_path / "pics", 12)
    originals = sorted(folder.rglob("*.png"))[:3]
    shutil.copy(originals[0], folder / "copy-a.png")
    shutil.copy(originals[0], folder / "copy-b.png")
    shutil.copy(originals[1], originals[1].parent / "again.png")
    assert fresh("index", str(folder), "--no-progress")[0] == 0
    first = originals[0].relative_to(folder).as_posix()
    second = originals[1].relative_to(folder).as_posix()
    groups = [
        sorted([first, "copy-a.png", "copy-b.png"]),
        sorted([second, f"{second.split('/')[0]}/again.png"]),
    ]
    code, out, err = fresh("duplicates", "--max-distance", "0.001", "--json")
    assert code == 0, err
    assert jsonl(out) == [{"ids": groups[0], "max_distance": 0.0}, {"ids": groups[1], "max_distance": 0.0}]
    assert err.startswith("2 groups, 5 items in them, of 15 compared, within 0.001 (--max-distance), in ")
    code, out, err = fresh("duplicates", "--max-distance", "0.001")
    lines = out.splitlines()
    assert code == 0 and lines[:4] == [
        "group 1: 3 items, max distance 0.0000",
        *(f"  {i}" for i in groups[0]),
    ]
    assert lines[4:7] == ["group 2: 2 items, max distance 0.0000", *(f"  {i}" for i in groups[1])]
    assert lines[7].startswith("2 groups, 5 items in them, of 15 compared, within 0.001") and len(lines) == 8
    code, out, err = fresh("duplicates", "--max-distance", "0.001", "--filter", "label!=pics", "--json")
    assert (
        code == 0
        and jsonl(out) == [{"ids": groups[1], "max_distance": 0.0}]
        and "of 13 compared (matching --filter label!=pics)" in err
    )


def test_duplicates_takes_its_distance_from_the_model_card(fresh: Cli, tmp_path: Path) -> None:
    folder = write_digits(tmp_path / "pics", 6)
    shutil.copy(next(folder.rglob("*.png")), folder / "copy.png")
    for name, model in (("carded", "carded"), ("bare", "bare")):
        assert fresh("collections", "create", name, "--model", model)[0] == 0
        assert fresh("index", str(folder), "--collection", name, "--no-progress")[0] == 0
    code, out, err = fresh("duplicates", "--collection", "carded")
    assert code == 0 and "1 group, 2 items in them, of 7 compared" in out, (out, err)
    assert f"within {DUPLICATE_DISTANCE} (duplicate_distance of the card of the model 'carded')" in out
    code, out, err = fresh("duplicates", "--collection", "bare")
    assert code == 2 and not out and len(err.strip().splitlines()) == 1, err
    assert err.startswith(
        "imgsearch duplicates: the card of the model 'bare' (which fills the collection 'bare') gives no "
        "duplicate_distance; give --max-distance D"
    ), err

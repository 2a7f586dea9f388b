"""The `imgsearch` command: index folders of images, search by image or id, evaluate, draw, train."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from typing import Any

import grpc
import numpy as np

from imgsearch import client_flags
from imgsearch.addresses import endpoint_count
from imgsearch.client import MAX_MESSAGE_BYTES, ImageSearch, IndexClient, Match, ModelNotServed, ServiceError
from imgsearch.evaluate import self_matches, unmatched_labels
from imgsearch.exchange import DEFAULT_IMPORT_BATCH
from imgsearch.filters import Condition, parse_filters
from imgsearch.flags import Entry, Flag, add_flags, secret
from imgsearch.ingest import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_IN_FLIGHT,
    DEFAULT_PATIENCE_S,
    NOVEL_ABOVE,
    SOURCE_KEY,
    ImageFile,
    IngestReport,
    collect_images,
    embed_all,
    embed_files,
    index_images,
    labelled,
    parse_meta,
    stored_ids,
)
from imgsearch.measure import RESULTS_PER_CALL, measure
from imgsearch.migrate import DEFAULT_PAGE_SIZE as MIGRATE_PAGE_SIZE
from imgsearch.words import plural


def _progress(total: int, description: str, enabled: bool, unit: str = "img"):  # type: ignore[no-untyped-def]
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit=unit, disable=not enabled, file=sys.stderr)


def counted(least: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least `least`, refused with a message otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{value} is less than {least}")
        return value

    return parse


def distance(text: str) -> float:
    """An argparse type: a Euclidean distance, a finite number of 0 or more."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text} is not a distance (a finite number of 0 or more)")
    return value


def _conditions(args: argparse.Namespace) -> list[Condition] | None:
    """The command's --filter arguments as conditions; None, once a line saying why is printed, when one
    cannot be read (the command then exits 2)."""
    try:
        return parse_filters(args.filter)
    except ValueError as error:
        print(f"imgsearch {args.command}: {error}", file=sys.stderr)
        return None


def _filter_words(args: argparse.Namespace) -> str:
    """The --filter arguments as given, for a summary: `--filter label=3 --filter source^=/x`."""
    return " ".join(f"--filter {text}" for text in args.filter)


def in_flight_for(encoder: str) -> int:
    """Batches to keep in flight: enough for every encoder replica to have one while a batch is stored."""
    return max(DEFAULT_IN_FLIGHT, endpoint_count(encoder) + 1)


def cmd_index(search: ImageSearch, args: argparse.Namespace) -> int:
    try:
        extra = parse_meta(args.meta)
    except ValueError as error:
        print(f"imgsearch index: {error}", file=sys.stderr)
        return 2
    search.pin()
    files, skipped = collect_images(args.paths)
    files = labelled(files, args.id_prefix, extra)
    if args.resume:
        stored = stored_ids(search.index)
        remaining = [image for image in files if image.id not in stored]
        already = len(files) - len(remaining)
        print(
            f"resuming: {already} of {plural(len(files), 'image')} {'is' if already == 1 else 'are'} "
            "already in the index"
        )
        files = remaining
    with _progress(len(files), "indexing", args.progress) as bar:
        report = index_images(
            search,
            files,
            args.batch_size,
            on_batch=bar.update,
            patience_s=args.patience_s,
            on_wait=lambda note: bar.write(f"imgsearch: {note}", file=sys.stderr),
            in_flight=in_flight_for(args.encoder) if args.in_flight is None else args.in_flight,
        )
    report.skipped[:0] = skipped
    where = "the index" if search.collection == "default" else f"the collection {search.collection!r}"
    print(f"indexed {plural(report.indexed, 'image')}; {where} now holds {report.count}")
    if len(report.by_replica) > 1:
        shares = ", ".join(f"{name} {count}" for name, count in sorted(report.by_replica.items()))
        print(f"embedded by {len(report.by_replica)} encoder replicas: {shares}")
    if report.novel:
        looks = "looks" if report.novel == 1 else "look"
        print(
            f"{report.novel} of them {looks} unlike the model's training data (novelty > {NOVEL_ABOVE:g}; "
            "each image's novelty is in its metadata `novelty`)"
        )
    collided = _collision_summary(report)
    if collided:
        print(collided)
    if report.skipped:
        print(f"skipped {plural(len(report.skipped), 'file')}:")
        for path, reason in report.skipped:
            print(f"  {path}: {reason}")
    return 0


def _collision_summary(report: IngestReport) -> str:
    """The line that says how many stored items of another `source` the ingest replaced, naming the first
    few; "" when none."""
    count = report.replaced_other_source
    if not count:
        return ""
    named = ", ".join(f"{c.id} (was {c.was or 'an item with no source'})" for c in report.collisions)
    more = count - len(report.collisions)
    return (
        f"warning: replaced {plural(count, 'item')} whose {SOURCE_KEY} was another file (ids collide; "
        f"--id-prefix keeps folders apart): {named}" + (f" and {more} more" if more > 0 else "")
    )


def cmd_reindex(search: ImageSearch, args: argparse.Namespace) -> int:
    from imgsearch.reindex import ReindexRefused, plan_reindex, run_reindex

    def note(text: str) -> None:
        print(f"imgsearch: {text}", file=sys.stderr)

    if args.to is not None and not args.to.strip():  # an empty address would fall back to IMGSEARCH_INDEX
        raise SystemExit("imgsearch reindex: --to needs the address of the index to fill, HOST:PORT")
    if args.to is None and args.to_collection is None:
        raise SystemExit(
            "imgsearch reindex: give --to-collection NEW (a collection of this index service, made with "
            "`imgsearch collections create NEW --model MODEL`) or --to HOST:PORT (another index service)"
        )
    to = args.to or args.index
    with ImageSearch(
        args.encoder,
        to,
        args.timeout_s,
        tls_ca=args.tls_ca,
        token=_token(args),
        collection=args.to_collection or args.collection,
    ) as target:
        try:
            plan = plan_reindex(search.index, target, args.patience_s, on_wait=note)
        except ReindexRefused as refused:
            print(f"imgsearch reindex: {refused}", file=sys.stderr)
            return 2
        with _progress(plan.total, "reindexing", args.progress) as bar:
            bar.update(len(plan.skipped))
            report = run_reindex(
                plan,
                target,
                args.batch_size,
                on_batch=bar.update,
                patience_s=args.patience_s,
                on_wait=lambda text: bar.write(f"imgsearch: {text}", file=sys.stderr),
            )
    if report.skipped:
        print(f"skipped {plural(len(report.skipped), 'item')}:")
        for item_id, reason in report.skipped:
            print(f"  {item_id}: {reason}")
    print(
        f"reindexed {report.reindexed} of {plural(report.total, 'item')} into {to}, collection "
        f"{target.collection!r} (model version {report.model_version or '-'}); skipped {len(report.skipped)}"
    )
    return 1 if report.skipped else 0


def cmd_migrate(search: ImageSearch, args: argparse.Namespace) -> int:
    from imgsearch.migrate import MigrateRefused, check_target, migrate

    def note(text: str) -> None:
        print(f"imgsearch: {text}", file=sys.stderr)

    if not args.to.strip():  # an empty address would fall back to IMGSEARCH_INDEX
        raise SystemExit("imgsearch migrate: --to needs the address of the index to fill, HOST:PORT")
    target = IndexClient(
        args.to,
        args.timeout_s,
        tls_ca=args.tls_ca,
        token=_token(args),
        collection=args.to_collection or args.collection,
    )
    try:
        _ensure_collection(search.index, target, note)
        checked = check_target(search.index, target, args.into_nonempty, args.patience_s, note)
        with _progress(checked[0].count, "migrating", args.progress and checked[0].count > 0) as bar:
            report = migrate(
                search.index,
                target,
                args.page_size,
                args.into_nonempty,
                args.patience_s,
                on_start=lambda total: bar.reset(total=total),
                on_page=bar.update,
                on_wait=lambda text: bar.write(f"imgsearch: {text}", file=sys.stderr),
                checked=checked,
            )
    except MigrateRefused as refused:
        print(f"imgsearch migrate: {refused}", file=sys.stderr)
        return 2
    finally:
        target.close()
    print(json.dumps(report.as_dict()) if args.json else report.summary())
    if report.mismatch:
        print(f"imgsearch migrate: {report.mismatch}", file=sys.stderr)
        return 1
    return 0


def _ensure_collection(source: IndexClient, target: IndexClient, note: Callable[[str], None]) -> None:
    """Creates the target collection, for the source collection's model, when the target has none of its
    name (an alias there is taken as it is)."""
    try:
        target.stats()
        return
    except ServiceError as error:
        if error.code != grpc.StatusCode.NOT_FOUND:
            raise
    model = source.stats().model_name
    target.create_collection(target.collection, model)
    note(f"created the collection {target.collection!r} (model {model or 'default'!r}) at {target.address}")


def _print_results(
    query: str,
    matches: Sequence[Match],
    as_json: bool,
    nothing: str = "no result",
    novelty: float | None = None,
) -> None:
    """One query's results: a JSON object (with the query's `novelty`, null when unknown), or a table,
    where a query without results says `nothing`."""
    if as_json:
        shown = None if novelty is None else round(novelty, 4)
        print(json.dumps({"query": query, "novelty": shown, "results": [m.as_dict() for m in matches]}))
        return
    print(f"{query}")
    if not matches:
        print(f"  {nothing}")
        return
    print(f"  {'rank':>4}  {'distance':>9}  {'label':<8} id")
    for rank, match in enumerate(matches, start=1):
        print(f"  {rank:>4}  {match.distance:>9.4f}  {match.metadata.get('label', ''):<8} {match.id}")


def _nothing_found(args: argparse.Namespace) -> str:
    """What the table says of a query with no result: `no result within 0.5 matching --filter label=3`."""
    said = "no result"
    if args.max_distance is not None:
        said += f" within {args.max_distance}"
    if args.filter:
        said += f" matching {_filter_words(args)}"
    return said


class NoveltyWarnings:
    """Warns on stderr of a query that looks unlike what its model was trained on (novelty above 1),
    naming the model's training set from its card (one Info call, the first time it is needed)."""

    def __init__(self, search: ImageSearch) -> None:
        self.search = search
        self._datasets: dict[str, str] | None = None

    def check(self, query: str, novelty: float | None, model: str) -> None:
        if novelty is None or not novelty > NOVEL_ABOVE:
            return
        dataset = self.dataset(model)
        trained = f"; trained on {dataset}" if dataset else ""
        print(
            f"imgsearch: warning: {query} looks unlike what the model {model or 'default'!r} was trained on "
            f"(novelty {novelty:.1f}{trained}): its results may mean little",
            file=sys.stderr,
        )

    def dataset(self, model: str) -> str:
        """The `dataset` of the model's card ("" the default model); "" when it cannot be read."""
        if self._datasets is None:
            self._datasets = {}
            try:
                info = self.search.encoder.info()
            except ServiceError:
                return ""
            for entry in info.get("models") or ():
                dataset = str((entry.get("card") or {}).get("dataset") or "")
                self._datasets[entry["name"]] = dataset
                if entry.get("default"):
                    self._datasets[""] = dataset
        return self._datasets.get(model, "")


def cmd_search(search: ImageSearch, args: argparse.Namespace) -> int:
    conditions = _conditions(args)
    if conditions is None:
        return 2
    nothing = _nothing_found(args)
    if args.id:
        found = search.search_by_id(args.id, args.k, filter=conditions, max_distance=args.max_distance)
        for item_id, matches in zip(args.id, found, strict=True):
            _print_results(item_id, matches, args.json, nothing)
        return 0
    if not args.images:
        raise SystemExit("imgsearch search: give image files, or --id ID")
    search.pin()
    if STDIN in args.images:
        return _search_stdin(search, args, conditions)
    files, skipped = collect_images(args.images)
    for path, reason in skipped:
        print(f"imgsearch: skipped {path}: {reason}", file=sys.stderr)
    embedded = embed_all(search.encoder, files, args.batch_size)
    for path, reason in embedded.skipped:
        print(f"imgsearch: skipped {path}: {reason}", file=sys.stderr)
    results = _search_in_batches(
        search,
        embedded.vectors,
        args.k,
        embedded.model_version,
        args.batch_size,
        conditions,
        args.max_distance,
    )
    warnings = NoveltyWarnings(search)
    for image, matches, novelty in zip(embedded.files, results, embedded.novelty, strict=True):
        warnings.check(str(image.path), novelty, embedded.model)
        _print_results(str(image.path), matches, args.json, nothing, novelty)
    return 0 if not (skipped or embedded.skipped) else 1


STDIN = "-"  # `imgsearch search -`: the query image is read from stdin


def _search_stdin(search: ImageSearch, args: argparse.Namespace, conditions: Sequence[Condition]) -> int:
    """`imgsearch search -`: one query image, its encoded bytes read from stdin (a pipe or a redirect, as
    `docker compose run -T client search - < photo.jpg` gives). An image the encoder cannot decode ends
    the command with its INVALID_ARGUMENT message (main prints it, exit 2)."""
    if args.images != [STDIN]:
        print(
            f"imgsearch search: {STDIN} reads one image from stdin: give it alone, not with files",
            file=sys.stderr,
        )
        return 2
    if sys.stdin is None or sys.stdin.isatty():
        print(
            f"imgsearch search: {STDIN} reads an image from stdin, which is a terminal here: redirect or "
            f"pipe one in (imgsearch search {STDIN} < photo.jpg; docker compose run needs -T for that)",
            file=sys.stderr,
        )
        return 2
    data = sys.stdin.buffer.read(MAX_MESSAGE_BYTES + 1)
    if not data:
        print(f"imgsearch search: {STDIN} reads an image from stdin, but stdin was empty", file=sys.stderr)
        return 2
    if len(data) > MAX_MESSAGE_BYTES:
        print(
            f"imgsearch search: stdin holds more than {MAX_MESSAGE_BYTES // 2**20} MiB, more than one call "
            "carries: not one image",
            file=sys.stderr,
        )
        return 2
    embedding = search.embed([data], search.pinned or search.target())
    (matches,) = search.index.search(
        embedding.vectors, args.k, embedding.model_version, filter=conditions, max_distance=args.max_distance
    )
    novelty = embedding.novelty[0] if embedding.novelty else None
    NoveltyWarnings(search).check("the image from stdin", novelty, embedding.model)
    _print_results(STDIN, matches, args.json, _nothing_found(args), novelty)
    return 0


def _search_in_batches(
    search: ImageSearch,
    vectors: np.ndarray,
    k: int,
    version: str,
    batch_size: int,
    conditions: Sequence[Condition] = (),
    max_distance: float | None = None,
) -> list[list[Match]]:
    """The matches of every query, in calls of up to batch_size queries, fewer where k is large, so that
    each call stays within the index's default results budget (--max-results)."""
    per_call = max(1, min(batch_size, RESULTS_PER_CALL // max(k, 1)))
    results: list[list[Match]] = []
    for start in range(0, len(vectors), per_call):
        results += search.index.search(
            vectors[start : start + per_call], k, version, filter=conditions, max_distance=max_distance
        )
    return results


def cmd_list(search: ImageSearch, args: argparse.Namespace) -> int:
    """Every stored item (those matching --filter), streamed page by page: one line each."""
    conditions = _conditions(args)
    if conditions is None:
        return 2
    listed = 0
    pages = search.index.scan(args.page_size, filter=conditions)
    try:
        for page in pages:
            lines = []
            for item_id, metadata in zip(page.ids, page.metadata, strict=True):
                entries = dict(sorted(metadata.items()))
                if args.json:
                    lines.append(json.dumps({"id": item_id, "metadata": entries}))
                else:
                    lines.append("  ".join([item_id, *(f"{k}={v}" for k, v in entries.items())]))
            if lines:
                print("\n".join(lines))
            listed += len(page.ids)
    finally:
        getattr(pages, "close", lambda: None)()  # cancels the scan when left early (a closed pipe)
    if not args.json:
        where = "the index" if search.collection == "default" else f"the collection {search.collection!r}"
        if conditions:
            held = search.index.stats().count
            print(f"{plural(listed, 'item')} matching {_filter_words(args)}, of {held} in {where}")
        else:
            print(f"{plural(listed, 'item')} in {where}")
    return 0


def cmd_export(search: ImageSearch, args: argparse.Namespace) -> int:
    from imgsearch.exchange import ExchangeRefused, export_collection

    conditions = _conditions(args)
    if conditions is None:
        return 2
    try:
        with _progress(0, "exporting", args.progress, "item") as bar:
            report = export_collection(
                search.index,
                args.output,
                page_size=args.page_size,
                filter=conditions,
                on_start=lambda total: bar.reset(total=total),
                on_page=bar.update,
            )
    except ExchangeRefused as refused:
        print(f"imgsearch export: {refused}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0


def cmd_import(search: ImageSearch, args: argparse.Namespace) -> int:
    from imgsearch.exchange import ExchangeRefused, import_collection

    try:
        with _progress(0, "importing", args.progress, "item") as bar:
            report = import_collection(
                search.index,
                args.input,
                batch_size=args.batch_size,
                patience_s=args.patience_s,
                note=lambda text: bar.write(f"imgsearch: {text}", file=sys.stderr),
                on_start=lambda total: bar.reset(total=total),
                on_batch=bar.update,
            )
    except ExchangeRefused as refused:
        print(f"imgsearch import: {refused}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0


DUPLICATE_CARD_KEY = "duplicate_distance"  # in a model's card: the distance within which two are copies
DUPLICATES_DEADLINE_S = 3600.0  # the Duplicates call compares every pair: give it time


def card_distance(search: ImageSearch) -> tuple[float | None, str]:
    """The duplicate distance the card of the model that fills the collection gives, and where it comes
    from (for the summary); (None, why not) when the card gives none."""
    target = search.target()
    try:
        info = search.encoder.info()
    except ServiceError as error:
        return None, f"the card of the model {target.model or 'default'!r} cannot be read: {error}"
    models: list[dict[str, Any]] = list(info.get("models") or ())
    entry = next(
        (m for m in models if m["name"] == target.model or (not target.model and m.get("default"))), None
    )
    if entry is None and not models:  # an encoder of one model, from before several were served
        entry = {"name": target.model or "default", "card": info.get("card") or {}}
    model = f"the model {target.model or 'default'!r}"
    filling = f"{model} (which fills the collection {target.collection!r})"
    if entry is None:
        served = ", ".join(m["name"] for m in models)
        return None, (
            f"the encoder serves no model {target.model!r}, which fills the collection "
            f"{target.collection!r} (it serves: {served}), so its card cannot be read"
        )
    value = (entry.get("card") or {}).get(DUPLICATE_CARD_KEY)
    if value is None:
        return None, f"the card of {filling} gives no {DUPLICATE_CARD_KEY}"
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        return None, f"the card of {filling} gives {DUPLICATE_CARD_KEY} {value!r}, not a distance"
    return float(value), f"{DUPLICATE_CARD_KEY} of the card of the model {entry['name']!r}"


def cmd_duplicates(search: ImageSearch, args: argparse.Namespace) -> int:
    conditions = _conditions(args)
    if conditions is None:
        return 2
    limit, said = args.max_distance, "--max-distance"
    if limit is None:
        limit, said = card_distance(search)
        if limit is None:
            print(
                f"imgsearch duplicates: {said}; give --max-distance D: items at most D apart count as "
                "duplicates (exact copies are 0 apart; `imgsearch search --id ID --json` shows distances)",
                file=sys.stderr,
            )
            return 2
    began = time.monotonic()
    found = search.index.duplicates(limit, filter=conditions, timeout_s=args.deadline_s)
    seconds = time.monotonic() - began
    lines = []
    for number, (ids, widest) in enumerate(found.groups, start=1):
        if args.json:
            lines.append(json.dumps({"ids": ids, "max_distance": widest}))
        else:
            lines.append(f"group {number}: {plural(len(ids), 'item')}, max distance {widest:.4f}")
            lines += [f"  {item_id}" for item_id in ids]
    if lines:
        print("\n".join(lines))
    grouped = sum(len(ids) for ids, _ in found.groups)
    compared = f"{found.items} compared" + (f" (matching {_filter_words(args)})" if conditions else "")
    print(
        f"{plural(len(found.groups), 'group')}, {plural(grouped, 'item')} in them, of {compared}, within "
        f"{limit} ({said}), in {seconds:.1f} s",
        file=sys.stderr if args.json else sys.stdout,
    )
    return 0


def cmd_delete(search: ImageSearch, args: argparse.Namespace) -> int:
    deleted, missing = search.index.delete(args.ids)
    print(f"deleted {deleted}" + (f"; {missing} not found" if missing else ""))
    return 0


def cmd_stats(search: ImageSearch, args: argparse.Namespace) -> int:
    stats = search.index.stats()
    if args.json:
        print(json.dumps(stats.__dict__))
    else:
        print(f"collection     {stats.collection}")
        print(f"model          {stats.model_name or '-'}")
        print(f"count          {stats.count}")
        print(f"dim            {stats.dim}")
        print(f"model version  {stats.model_version or '-'}")
        print(f"bytes used     {stats.bytes_used}")
    return 0


def cmd_info(search: ImageSearch, args: argparse.Namespace) -> int:
    print(json.dumps(search.encoder.info(), indent=2))
    return 0


def cmd_eval(search: ImageSearch, args: argparse.Namespace) -> int:
    search.pin()
    files, _ = collect_images([args.folder])
    with _progress(len(files), "embedding queries", args.progress) as bar:
        try:
            measured = measure(search, files, args.k, args.batch_size, on_batch=bar.update)
        except ValueError:
            raise SystemExit(f"imgsearch eval: no usable images under {args.folder}") from None
    kept, results, labels, bad = measured.queries, measured.results, measured.labels, measured.skipped
    quality = measured.quality
    for warning in _eval_warnings(kept, results, labels):
        print(f"imgsearch eval: warning: {warning}", file=sys.stderr)
    if args.json:
        print(
            json.dumps(
                {**quality.__dict__, "per_class": {c: q.__dict__ for c, q in quality.per_class.items()}}
            )
        )
        return 0
    print(f"queries {quality.queries} (skipped {len(bad)}), k = {quality.k}")
    print(f"P@1    {quality.p_at_1:.4f}")
    print(f"P@{quality.k:<5}{quality.p_at_k:.4f}")
    print(f"mAP@{quality.k:<3}{quality.map_at_k:.4f}")
    print(f"{'class':<10}{'queries':>8}{'P@1':>8}{f'P@{quality.k}':>8}{f'mAP@{quality.k}':>9}")
    for label, q in quality.per_class.items():
        print(f"{label:<10}{q.queries:>8}{q.p_at_1:>8.4f}{q.p_at_k:>8.4f}{q.map_at_k:>9.4f}")
    return 0


def _listed(names: Sequence[str], most: int = 12) -> str:
    shown = ", ".join(repr(name) for name in names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def _eval_warnings(
    queries: Sequence[ImageFile], results: Sequence[Sequence[Match]], labels: Sequence[Sequence[str]]
) -> list[str]:
    """What makes eval's figures mean something else than they seem: query labels no result carries
    (the figures are then 0 for them), and queries the index holds themselves (self-matches)."""
    warnings = []
    query_labels = sorted({q.label for q in queries})
    unmatched = unmatched_labels(query_labels, labels)
    if unmatched:
        carried = sorted({label for row in labels for label in row if label})
        if carried:
            seen = f"the results' labels are {_listed(carried)}"
        elif any(results):
            seen = "the results carry no labels"
        else:
            seen = "the index returned no results at all (is it empty?)"
        which = (
            f"no result carries any of the queries' labels ({_listed(unmatched)}), so every figure is 0"
            if len(unmatched) == len(query_labels)
            else f"no result carries the {plural(len(unmatched), 'label')} {_listed(unmatched)}, so "
            "those classes score 0"
        )
        warnings.append(
            f"{which}; {seen}. A query's label is its subfolder's name: name the subfolders by the labels "
            "the index was built with (the `label` metadata of its items)"
        )
    held = self_matches([q.id for q in queries], [(r[0].id, r[0].distance) if r else None for r in results])
    if held:
        total = plural(len(queries), "query", "queries")
        share = (
            "every query is" if held == len(queries) else f"{held} of {total} {'is' if held == 1 else 'are'}"
        )
        warnings.append(
            f"{share} already in the index (the nearest result has the query's id or lies at distance 0), "
            "so the figures measure self-matches, not retrieval: evaluate with queries that the index lacks"
        )
    return warnings


def cmd_show(search: ImageSearch, args: argparse.Namespace) -> int:
    from imgsearch.show import draw_similar

    search.pin()
    files, _ = collect_images(args.images)
    kept, vectors, version, bad = embed_files(search.encoder, files)
    for path, reason in bad:
        print(f"imgsearch: skipped {path}: {reason}", file=sys.stderr)
    if not kept:
        raise SystemExit("imgsearch show: no usable query images")
    results = search.index.search(vectors, args.k, version)
    output = draw_similar([(str(f.path), f.path.read_bytes()) for f in kept], results, args.output)
    print(f"wrote {output}")
    return 0


GLOBAL_FLAGS: list[Entry] = [
    client_flags.ENCODER,
    client_flags.INDEX,
    Flag(
        "--timeout-s",
        "deadline of each call in seconds",
        "IMGSEARCH_TIMEOUT_S",
        60.0,
        float,
        shown_default="60",
    ),
    client_flags.TLS_CA,
    client_flags.TOKEN,
]


COLLECTION_FLAG = Flag(
    "--collection",
    "the collection (or alias) to work on; image calls are embedded by the model that fills it",
    "IMGSEARCH_COLLECTION",
    "default",
)


def build_parser() -> argparse.ArgumentParser:
    # No abbreviated global flags: they would claim the commands' flags too (`reindex --to` would be
    # taken for an ambiguous `--token`).
    parser = argparse.ArgumentParser(prog="imgsearch", description=__doc__, allow_abbrev=False)
    add_flags(parser, GLOBAL_FLAGS)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str, handler: object, help_text: str, *, collection: bool = True
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(handler=handler)
        if collection:
            add_flags(sub, [COLLECTION_FLAG])
        return sub

    def batch_flags(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--batch-size", type=counted(1), default=DEFAULT_BATCH_SIZE, help="images per call")
        sub.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")

    def filter_flag(sub: argparse.ArgumentParser, what: str) -> None:
        sub.add_argument(
            "--filter",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help=f"{what} only the items whose metadata KEY is VALUE; repeat it: different keys must all "
            "hold, the same key twice means any of the values; KEY!=VALUE: KEY is not VALUE (or missing); "
            "KEY^=PREFIX: KEY starts with PREFIX (e.g. --filter label=3 --filter label=5 "
            "--filter source^=/data/albumA/)",
        )

    def patience_flag(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--patience-s",
            type=float,
            default=DEFAULT_PATIENCE_S,
            help="while a service is unreachable (restarting, a replica gone), retry each batch for up to "
            f"this long before giving up (default {DEFAULT_PATIENCE_S:.0f}; 0 fails at once)",
        )

    sub = command("index", cmd_index, "index image files and folders (recursively)")
    sub.add_argument("paths", nargs="+", metavar="PATH")
    sub.add_argument(
        "--resume",
        action="store_true",
        help="skip the images whose ids the index already holds (continue an ingest that stopped)",
    )
    sub.add_argument(
        "--id-prefix",
        default="",
        metavar="P",
        help="put P before every id, verbatim (--id-prefix albumA/ gives albumA/trip/img1.png): keeps "
        "folders with the same relative paths apart in one collection (ids are the paths relative to "
        "the folder given); --resume takes the prefix into account",
    )
    sub.add_argument(
        "--meta",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="add this metadata to every image (repeatable; a key given twice: the last wins). It wins "
        "over the built-in `label` (the parent folder's name); `source` (the image's path, which "
        "reindex reads it again from) cannot be set",
    )
    sub.add_argument(
        "--in-flight",
        type=counted(0),
        default=None,
        help="batches read and embedded ahead of the one being stored, so that several encoder replicas "
        "work at once; memory grows with it, not with the folder (default: one more than the encoder "
        f"addresses the target resolves to, at least {DEFAULT_IN_FLIGHT}; 0: one batch at a time)",
    )
    patience_flag(sub)
    batch_flags(sub)
    sub = command(
        "reindex",
        cmd_reindex,
        "copy every item of a collection (--collection) into another collection, of this index service "
        "(--to-collection) or another (--to), each image embedded again from its `source` path by the model "
        "that fills the new collection: how to change models (README, Collections and model changes)",
    )
    sub.add_argument(
        "--to-collection",
        metavar="NEW",
        help="the collection to fill (an alias is taken as its collection): a new, empty one, made with "
        "`imgsearch collections create NEW --model MODEL`, or one a reindex already began (default: "
        "--collection's name, in the index --to)",
    )
    sub.add_argument(
        "--to",
        metavar="HOST:PORT",
        help="the index service to fill, when not this one (--index)",
    )
    patience_flag(sub)
    batch_flags(sub)
    sub = command(
        "migrate",
        cmd_migrate,
        "copy every item of the index (--index) into another index service as it is (ids, metadata, "
        "vectors, model version; nothing is embedded again): how to move a collection to another backend "
        "or machine. The source is copied as it was when the command began: writes made to it meanwhile "
        "are not copied. Upserts are by id, so running it again stores each item once",
    )
    sub.add_argument(
        "--to",
        required=True,
        metavar="HOST:PORT",
        help="the index to fill: another index service, empty (see --into-nonempty), e.g. one started "
        "with --backend milvus",
    )
    sub.add_argument(
        "--to-collection",
        metavar="NAME",
        help="the collection to fill there, made for the source's model when it does not exist "
        "(default: --collection's name)",
    )
    sub.add_argument(
        "--into-nonempty",
        action="store_true",
        help="copy into a target that already holds items (of the same model version and dim): items "
        "with the same id are replaced, the others kept; to finish a migration that stopped, run it "
        "again with this",
    )
    sub.add_argument(
        "--page-size",
        type=counted(1),
        default=MIGRATE_PAGE_SIZE,
        help=f"items per scan page and per upsert (default {MIGRATE_PAGE_SIZE:,}: the fewer the calls, the "
        "faster, on Milvus above all); halved while the target refuses a page as over its --max-batch",
    )
    patience_flag(sub)
    sub.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    sub.add_argument("--json", action="store_true", help="the summary as one JSON object")
    sub = command(
        "search",
        cmd_search,
        f"find the stored images most similar to images (files, or one on stdin: {STDIN}), or to stored ids",
    )
    sub.add_argument(
        "images",
        nargs="*",
        metavar="IMAGE",
        help=f"image files and folders; {STDIN} alone reads one image (its encoded bytes) from stdin: "
        f"imgsearch search {STDIN} < photo.jpg (the query is then named {STDIN})",
    )
    sub.add_argument(
        "--id", nargs="+", metavar="ID", help="search by stored ids instead (excluding each itself)"
    )
    sub.add_argument("-k", type=int, default=10, help="results per query (default 10)")
    filter_flag(sub, "search")
    sub.add_argument(
        "--max-distance",
        type=distance,
        metavar="D",
        help="leave out results farther than D (Euclidean; one at exactly D is kept), so a query may get "
        'fewer than k results, or none (the table then says so; --json gives "results": [])',
    )
    sub.add_argument(
        "--json",
        action="store_true",
        help='one JSON object per query: {"query": ..., "novelty": ..., "results": [...]}; novelty is how '
        "unlike the model's training data the query looks (above 1: unlike it, and a warning on stderr; "
        "null when unknown, as for --id)",
    )
    batch_flags(sub)
    sub = command(
        "list",
        cmd_list,
        "every stored item (or those --filter keeps) with its metadata, one line each, in the index's "
        "order; streamed page by page, so it works for any size; a count line at the end",
    )
    filter_flag(sub, "list")
    sub.add_argument(
        "--json",
        action="store_true",
        help='one JSON object per item, {"id": ..., "metadata": {...}}, and no count line',
    )
    sub.add_argument(
        "--page-size",
        type=counted(0),
        default=0,
        help="items per scan page (default 0: the server's, 1000 or its --max-batch when lower)",
    )
    sub = command(
        "export",
        cmd_export,
        "write every item of the collection (ids, vectors, metadata, model name and version) to one .npz "
        "file, to keep or to load elsewhere with `imgsearch import`; keys: ids, vectors (float32 "
        "[N, dim]), metadata (one JSON object per item), model_version, model_name, collection, dim",
    )
    sub.add_argument("output", metavar="OUT.npz", help="the file to write (replaced when it exists)")
    filter_flag(sub, "export")
    sub.add_argument(
        "--page-size",
        type=counted(0),
        default=0,
        help="items per scan page (default 0: the server's, 1000 or its --max-batch when lower)",
    )
    sub.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    sub = command(
        "import",
        cmd_import,
        "store the items of an `imgsearch export` file into --collection under their ids, with their "
        "metadata, vectors and model version (nothing is embedded again); the collection is made for the "
        "file's model when it does not exist, and refused when it holds another model version or dim",
    )
    sub.add_argument("input", metavar="IN.npz", help="a file `imgsearch export` wrote")
    sub.add_argument(
        "--batch-size",
        type=counted(1),
        default=DEFAULT_IMPORT_BATCH,
        help=f"items per upsert (default {DEFAULT_IMPORT_BATCH:,}; at most the index's --max-batch)",
    )
    patience_flag(sub)
    sub.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    sub = command(
        "duplicates",
        cmd_duplicates,
        "find the groups of near-duplicate items: items at most --max-distance apart are linked, and each "
        "group is a set of linked items (one batched search in the index service)",
    )
    sub.add_argument(
        "--max-distance",
        type=distance,
        metavar="D",
        help=f"items at most D apart (Euclidean) count as duplicates (default: the `{DUPLICATE_CARD_KEY}` "
        "of the card of the model that fills the collection; `imgsearch info` shows the cards)",
    )
    filter_flag(sub, "compare")
    sub.add_argument(
        "--json",
        action="store_true",
        help='one JSON object per group, {"ids": [...], "max_distance": x}; the summary goes to stderr',
    )
    sub.add_argument(
        "--deadline-s",
        type=float,
        default=DUPLICATES_DEADLINE_S,
        help=f"how long the comparison may take, in seconds (default {DUPLICATES_DEADLINE_S:.0f})",
    )
    sub = command("delete", cmd_delete, "remove ids from the index")
    sub.add_argument("ids", nargs="+", metavar="ID")
    sub = command("stats", cmd_stats, "the index's count, dim, model version and memory")
    sub.add_argument("--json", action="store_true")
    command(
        "info",
        cmd_info,
        "the encoder's models: version, dim, input shape, runtime, training card",
        collection=False,
    )
    from imgsearch import catalog_cli

    catalog_cli.add_commands(commands, command)
    sub = command(
        "eval",
        cmd_eval,
        "retrieval quality of the index for a folder of labelled queries; `imgsearch eval --suite` "
        "instead measures every shipped model beside the baselines (`make eval`; --suite --help)",
    )
    sub.add_argument("folder", metavar="QUERY_FOLDER", help="queries in subfolders named by their label")
    sub.add_argument("-k", type=int, default=10)
    sub.add_argument("--json", action="store_true")
    batch_flags(sub)
    sub = command("show", cmd_show, "draw each query beside its nearest neighbours into a PNG")
    sub.add_argument("images", nargs="+", metavar="IMAGE")
    sub.add_argument("-k", type=int, default=3, help="neighbours per query (default 3)")
    sub.add_argument("-o", "--output", default="similar.png", help="the PNG to write (default similar.png)")
    commands.add_parser(
        "train",
        help="train an autoencoder (python -m encoder_service.train; needs TensorFlow)",
        add_help=False,
    )
    commands.add_parser(
        "web",
        help="the web gateway: a search page and a JSON API on port 8080 (python -m web; `imgsearch web "
        "--help` for its flags, which include --encoder and --index)",
        add_help=False,
    )
    return parser


PLUGINS = "imgsearch.commands"  # entry points (pyproject.toml): commands the client does not import
PLUGIN_EXTRAS = {"train": "train", "web": "web", "eval-suite": "train"}


def _plugin(name: str, argv: list[str]) -> int:
    """Runs the command another package provides (training, the gateway, the quality suite) through its
    entry point, so the client imports none of their code, nor TensorFlow or FastAPI."""
    install = f"pip install 'imgsearch[{PLUGIN_EXTRAS[name]}]'"
    found = entry_points(group=PLUGINS, name=name)
    if not found:
        raise SystemExit(f"imgsearch {name.replace('-', ' --')}: not installed here; {install}")
    try:
        command = next(iter(found)).load()
    except ImportError as error:
        raise SystemExit(f"imgsearch {name}: {error}; {install}") from None
    return int(command(argv))


def _token(args: argparse.Namespace) -> str | None:
    """The bearer token: --token, --token-file, IMGSEARCH_TOKEN, IMGSEARCH_TOKEN_FILE, the first set wins."""
    return secret(args, client_flags.TOKEN)


SIGPIPE_EXIT = 128 + 13  # what a shell reports for a command that SIGPIPE ended, as `yes | head -1` gives


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one command; returns its exit code. When the reader of stdout goes away before the output is
    all written (`imgsearch stats | head -1`), stops quietly with SIGPIPE_EXIT instead of a traceback or an
    "Exception ignored ... BrokenPipeError" at exit: stdout is flushed here, and pointed at /dev/null for
    the interpreter's own flush (https://docs.python.org/3/library/signal.html#note-on-sigpipe)."""
    try:
        try:
            return _main(argv)
        finally:  # SystemExit too (`--help | head -1`): the output is written here, not at exit
            sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return SIGPIPE_EXIT


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["train"], ["web"]):
        return _plugin(argv[0], argv[1:])
    if argv[:2] == ["eval", "--suite"]:
        return _plugin("eval-suite", argv[2:])
    args = build_parser().parse_args(argv)
    if args.command in ("train", "web"):  # global flags before them: theirs come after the command
        raise SystemExit(f"imgsearch: put the flags after {args.command}: imgsearch {args.command} --help")
    try:
        token = _token(args)
        with ImageSearch(
            args.encoder,
            args.index,
            args.timeout_s,
            tls_ca=args.tls_ca,
            token=token,
            collection=getattr(args, "collection", None),
        ) as search:
            try:
                return int(args.handler(search, args))
            except ModelNotServed as error:
                raise search.not_served(error) from None
    except ServiceError as error:
        hint = ""
        if error.code == grpc.StatusCode.UNAUTHENTICATED:
            hint = "; set IMGSEARCH_TOKEN (or --token) to the services' token"
        print(f"imgsearch: {error}{hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("imgsearch: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # an OSError, but not the command's: stdout's reader went away (see main)
        raise
    except (OSError, ValueError) as error:
        print(f"imgsearch: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

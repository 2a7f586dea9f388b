"""The `imgsearch` command: index folders of images, search by image or id, evaluate, draw, train."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points

import grpc
import numpy as np

from imgsearch import client_flags
from imgsearch.addresses import endpoint_count
from imgsearch.client import MAX_MESSAGE_BYTES, ImageSearch, IndexClient, Match, ModelNotServed, ServiceError
from imgsearch.evaluate import self_matches, unmatched_labels
from imgsearch.flags import Entry, Flag, add_flags, secret
from imgsearch.ingest import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_IN_FLIGHT,
    DEFAULT_PATIENCE_S,
    ImageFile,
    collect_images,
    embed_files,
    index_images,
    stored_ids,
)
from imgsearch.measure import measure, search_in_batches
from imgsearch.migrate import DEFAULT_PAGE_SIZE as MIGRATE_PAGE_SIZE
from imgsearch.words import plural


def _progress(total: int, description: str, enabled: bool):  # type: ignore[no-untyped-def]
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit="img", disable=not enabled, file=sys.stderr)


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


def in_flight_for(encoder: str) -> int:
    """Batches to keep in flight: enough for every encoder replica to have one while a batch is stored."""
    return max(DEFAULT_IN_FLIGHT, endpoint_count(encoder) + 1)


def cmd_index(search: ImageSearch, args: argparse.Namespace) -> int:
    search.pin()
    files, skipped = collect_images(args.paths)
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
    if report.skipped:
        print(f"skipped {plural(len(report.skipped), 'file')}:")
        for path, reason in report.skipped:
            print(f"  {path}: {reason}")
    return 0


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


def _print_results(query: str, matches: Sequence[Match], as_json: bool) -> None:
    if as_json:
        print(json.dumps({"query": query, "results": [m.as_dict() for m in matches]}))
        return
    print(f"{query}")
    print(f"  {'rank':>4}  {'distance':>9}  {'label':<8} id")
    for rank, match in enumerate(matches, start=1):
        print(f"  {rank:>4}  {match.distance:>9.4f}  {match.metadata.get('label', ''):<8} {match.id}")


def cmd_search(search: ImageSearch, args: argparse.Namespace) -> int:
    if args.id:
        for item_id, matches in zip(args.id, search.search_by_id(args.id, args.k), strict=True):
            _print_results(item_id, matches, args.json)
        return 0
    if not args.images:
        raise SystemExit("imgsearch search: give image files, or --id ID")
    search.pin()
    if STDIN in args.images:
        return _search_stdin(search, args)
    files, skipped = collect_images(args.images)
    for path, reason in skipped:
        print(f"imgsearch: skipped {path}: {reason}", file=sys.stderr)
    kept, vectors, version, bad = embed_files(search.encoder, files, args.batch_size)
    for path, reason in bad:
        print(f"imgsearch: skipped {path}: {reason}", file=sys.stderr)
    results = _search_in_batches(search, vectors, args.k, version, args.batch_size)
    for image, matches in zip(kept, results, strict=True):
        _print_results(str(image.path), matches, args.json)
    return 0 if not (skipped or bad) else 1


STDIN = "-"  # `imgsearch search -`: the query image is read from stdin


def _search_stdin(search: ImageSearch, args: argparse.Namespace) -> int:
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
    (matches,) = search.search([data], args.k)
    _print_results(STDIN, matches, args.json)
    return 0


def _search_in_batches(
    search: ImageSearch, vectors: np.ndarray, k: int, version: str, batch_size: int
) -> list[list[Match]]:
    return search_in_batches(search.index, vectors, k, version, batch_size)


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
    sub.add_argument("--json", action="store_true", help="one JSON object per query")
    batch_flags(sub)
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

"""`imgsearch collections ...` and `imgsearch aliases ...`: the index's named collections, the aliases
that name them, and the evaluation gate on moving an alias (`aliases set --if-better QUERIES_DIR`)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from imgsearch.client import ImageSearch, ServiceError
from imgsearch.ingest import collect_images
from imgsearch.measure import Measured, measure
from imgsearch.words import plural

Command = Callable[..., argparse.ArgumentParser]


def cmd_collections_create(search: ImageSearch, args: argparse.Namespace) -> int:
    served = _served_models(search)
    created = search.index.create_collection(args.name, args.model)
    filled = (
        f"filled by the model {args.model!r}"
        if args.model
        else "filled by the model its first vectors come from (the encoder's default model)"
    )
    print(f"created the collection {created.name!r}, {filled}")
    if served is not None and args.model and args.model not in served:
        print(
            f"imgsearch: warning: the encoder at {search.encoder.address} does not serve the model "
            f"{args.model!r} (it serves: {', '.join(served)}); start it with --models including it before "
            "indexing into this collection",
            file=sys.stderr,
        )
    return 0


def _served_models(search: ImageSearch) -> list[str] | None:
    """The encoder's model names, None when it cannot be asked (a warning is all it is for)."""
    try:
        info = search.encoder.info()
    except ServiceError:
        return None
    return [m["name"] for m in info.get("models") or ()] or None


def cmd_collections_list(search: ImageSearch, args: argparse.Namespace) -> int:
    collections = search.index.list_collections()
    if args.json:
        for info in collections:
            print(json.dumps(info.as_dict()))
        return 0
    print(f"{'collection':<24} {'count':>9} {'dim':>5} {'model':<16} {'version':<14} {'bytes':>12} aliases")
    for info in collections:
        print(
            f"{info.name:<24} {info.count:>9} {info.dim:>5} {info.model_name or '-':<16} "
            f"{(info.model_version or '-')[:14]:<14} {info.bytes_used:>12} {', '.join(info.aliases) or '-'}"
        )
    return 0


def cmd_collections_drop(search: ImageSearch, args: argparse.Namespace) -> int:
    dropped = search.index.drop_collection(args.name)
    print(f"dropped the collection {args.name!r} and its {plural(dropped, 'item')}")
    return 0


def cmd_aliases_set(search: ImageSearch, args: argparse.Namespace) -> int:
    if args.if_better is not None:
        refused = _gate(search, args)
        if refused:
            return 1
    previous = search.index.set_alias(args.alias, args.collection)
    if previous == args.collection:
        print(f"the alias {args.alias!r} already points at {args.collection!r}")
    elif previous:
        print(f"the alias {args.alias!r} now points at {args.collection!r} (before: {previous!r})")
    else:
        print(f"the alias {args.alias!r} points at {args.collection!r}")
    return 0


def _figure(measured: Measured) -> str:
    q = measured.quality
    return (
        f"P@{q.k} {q.p_at_k:.4f} (P@1 {q.p_at_1:.4f}, mAP@{q.k} {q.map_at_k:.4f}; {q.queries} queries, "
        f"model {measured.model or 'default'!r})"
    )


def _gate(search: ImageSearch, args: argparse.Namespace) -> bool:
    """Measures the alias's current collection and the new one on the labelled queries; prints both and
    returns True when the new one is worse (the alias is then left as it is)."""
    files, _ = collect_images([args.if_better])
    if not files:
        raise SystemExit(f"imgsearch aliases set: no images under {args.if_better}")
    current = search.index.list_aliases().get(args.alias)
    new = measure(search, files, args.k, args.batch_size, args.collection)
    print(f"{args.collection} (new): {_figure(new)}")
    if current is None or current == args.collection:
        print(f"the alias {args.alias!r} points at nothing yet: nothing to compare with")
        return False
    old = measure(search, files, args.k, args.batch_size, current)
    print(f"{current} (current): {_figure(old)}")
    if new.quality.p_at_k < old.quality.p_at_k:
        print(
            f"imgsearch aliases set: refused: {args.collection!r} retrieves worse than {current!r} on "
            f"{args.if_better} (P@{args.k} {new.quality.p_at_k:.4f} < {old.quality.p_at_k:.4f}); the alias "
            f"{args.alias!r} still points at {current!r}",
            file=sys.stderr,
        )
        return True
    return False


def cmd_aliases_list(search: ImageSearch, args: argparse.Namespace) -> int:
    aliases = search.index.list_aliases()
    if args.json:
        for alias, collection in aliases.items():
            print(json.dumps({"alias": alias, "collection": collection}))
        return 0
    print(f"{'alias':<24} collection")
    for alias, collection in aliases.items():
        print(f"{alias:<24} {collection}")
    return 0


def cmd_aliases_drop(search: ImageSearch, args: argparse.Namespace) -> int:
    collection = search.index.drop_alias(args.alias)
    print(f"dropped the alias {args.alias!r} (it pointed at {collection!r})")
    return 0


def add_commands(commands: argparse._SubParsersAction, command: Command) -> None:  # type: ignore[type-arg]
    """Adds `collections` and `aliases`, each with its actions, to the CLI's commands."""
    group = command(
        "collections",
        None,
        "the index's named collections: each holds the vectors of one model (create, list, drop)",
        collection=False,
    )
    actions = group.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, handler: object, help_text: str) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(handler=handler)
        return sub

    sub = action("create", cmd_collections_create, "a new, empty collection for a model")
    sub.add_argument("name", metavar="NAME", help="[a-z0-9][a-z0-9_-]{0,63}")
    sub.add_argument(
        "--model",
        default="",
        help="the encoder model (a name in its --models) whose vectors fill it; searches and indexing in the "
        "collection use it (default: the encoder's default model, recorded by the first vectors)",
    )
    sub = action("list", cmd_collections_list, "every collection: count, dim, model, bytes, aliases")
    sub.add_argument("--json", action="store_true", help="one JSON object per collection")
    sub = action("drop", cmd_collections_drop, "remove a collection and all its items")
    sub.add_argument("name", metavar="NAME")

    group = command(
        "aliases",
        None,
        "names that point at a collection, moved atomically: how to switch models without downtime",
        collection=False,
    )
    actions = group.add_subparsers(dest="action", required=True, metavar="ACTION")
    sub = action(
        "set",
        cmd_aliases_set,
        "point an alias at a collection (made or moved atomically: searches see the old or the new one)",
    )
    sub.add_argument("alias", metavar="ALIAS")
    sub.add_argument("collection", metavar="COLLECTION")
    sub.add_argument(
        "--if-better",
        metavar="QUERIES_DIR",
        help="first measure P@k of the alias's current collection and of COLLECTION on these labelled "
        "queries (subfolders named by label), each embedded by its collection's model, and move the alias "
        "only when COLLECTION is at least as good; exit 1 when it is not",
    )
    sub.add_argument("-k", type=int, default=10, help="k for --if-better (default 10)")
    sub.add_argument("--batch-size", type=int, default=256, help="queries per call for --if-better")
    sub = action("list", cmd_aliases_list, "every alias and its collection")
    sub.add_argument("--json", action="store_true", help="one JSON object per alias")
    sub = action("drop", cmd_aliases_drop, "remove an alias (not its collection)")
    sub.add_argument("alias", metavar="ALIAS")

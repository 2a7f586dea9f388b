"""Flags with env-var defaults, declared as tables that every entry point builds its parser from: one way
to read an env var, one style of error (a line naming the variable, never a traceback), help that always
says the env var and the default."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from imgsearch import security

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


@dataclass(frozen=True)
class Flag:
    """One flag: its name, what it is for, the env var that gives its default, the built-in default, and
    how a value (from the command line or the env var) is converted and checked."""

    name: str  # "--port"
    help: str  # what it does, without the env var and default: those are added
    env: str | None = None
    default: Any = None
    type: Callable[[str], Any] | None = None  # raises ValueError or ArgumentTypeError on a bad value
    choices: tuple[str, ...] | None = None
    switch: bool = False  # on when given; its env var takes 1/true/yes/on or 0/false/no/off
    shown_default: str | None = None  # how the help shows the default; None: the default itself

    def help_text(self) -> str:
        notes = [f"env {self.env}"] if self.env else []
        shown = self.shown_default
        if shown is None and self.default is not None and not self.switch:
            shown = str(self.default)
        if shown:
            notes.append(f"default {shown}")
        return f"{self.help} ({', '.join(notes)})" if notes else self.help


@dataclass(frozen=True)
class SecretFlag:
    """A secret given as --NAME or --NAME-file, or by the env vars ENV or ENV_FILE: the first of those
    four that is set wins (`secret` reads it). The value never shows in help or logs."""

    name: str  # "--token"
    env: str  # "IMGSEARCH_TOKEN"; the file's is ENV_FILE
    help: str
    what: str = "token"

    @property
    def file_name(self) -> str:
        return f"{self.name}-file"

    @property
    def file_env(self) -> str:
        return f"{self.env}_FILE"


Entry = Flag | SecretFlag


def add_flags(
    parser: argparse.ArgumentParser, flags: Iterable[Entry], environ: Mapping[str, str] | None = None
) -> None:
    """Adds each flag, its default taken from its env var when that is set (an empty value counts as
    unset); a bad env value ends the program with one line naming the variable (parser.error)."""
    env = os.environ if environ is None else environ
    for flag in flags:
        if isinstance(flag, SecretFlag):
            parser.add_argument(flag.name, help=f"{flag.help} (env {flag.env})")
            parser.add_argument(
                flag.file_name,
                help=f"read the {flag.what} from this file, e.g. a Docker secret (env {flag.file_env})",
            )
            continue
        default = flag.default
        raw = env.get(flag.env, "") if flag.env else ""
        if raw.strip():
            default = _from_env(parser, flag, raw)
        options: dict[str, Any] = {"default": default, "help": flag.help_text()}
        if flag.switch:
            parser.add_argument(flag.name, action="store_true", **options)
            continue
        if flag.type is not None:
            options["type"] = flag.type
        if flag.choices is not None:
            options["choices"] = flag.choices
        parser.add_argument(flag.name, **options)


def _from_env(parser: argparse.ArgumentParser, flag: Flag, raw: str) -> Any:
    value = raw.strip()
    if flag.switch:
        if value.lower() in TRUE_WORDS:
            return True
        if value.lower() in FALSE_WORDS:
            return False
        parser.error(f"{flag.env}={raw!r}: give one of {', '.join(TRUE_WORDS + FALSE_WORDS)} ({flag.name})")
    try:
        converted = flag.type(value) if flag.type is not None else value
    except (ValueError, TypeError, argparse.ArgumentTypeError) as error:
        parser.error(f"{flag.env}={raw!r}: {error or 'not a valid value'} ({flag.name})")
    if flag.choices is not None and converted not in flag.choices:
        parser.error(f"{flag.env}={raw!r}: choose from {', '.join(flag.choices)} ({flag.name})")
    return converted


def secret(
    args: argparse.Namespace, flag: SecretFlag, environ: Mapping[str, str] | None = None
) -> str | None:
    """The secret from --NAME, --NAME-file, ENV or ENV_FILE, the first set winning, stripped; None when
    none is. Raises ValueError when both flags are given, OSError or ValueError for a file that cannot be
    read or is empty."""
    env = os.environ if environ is None else environ
    value = getattr(args, _dest(flag.name))
    path = getattr(args, _dest(flag.file_name))
    if value and path:
        raise ValueError(f"give {flag.name} or {flag.file_name}, not both")
    if value and value.strip():
        return str(value).strip()
    if path:
        return security.read_token_file(path)
    if env.get(flag.env, "").strip():
        return env[flag.env].strip()
    if env.get(flag.file_env, "").strip():
        return security.read_token_file(env[flag.file_env].strip())
    return None


def _dest(name: str) -> str:
    return name.lstrip("-").replace("-", "_")

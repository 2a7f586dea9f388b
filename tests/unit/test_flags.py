"""The flag table: env values converted and checked with one line naming the variable, switches, secrets
from flags, files or env vars, and help that says each env var and default. No sockets."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from imgsearch.flags import Flag, SecretFlag, add_flags, secret

FLAGS = [
    Flag("--port", "port to listen on", "X_PORT", 50051, int),
    Flag("--mode", "a mode", "X_MODE", "a", choices=("a", "b")),
    Flag("--loud", "say more", "X_LOUD", False, switch=True),
    Flag("--grace-s", "seconds", "X_GRACE_S", 10.0, float, shown_default="10"),
]
TOKEN = SecretFlag("--token", "X_TOKEN", "the token")


def parse(argv: list[str], environ: dict[str, str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="prog")
    add_flags(parser, [*FLAGS, TOKEN], environ)
    return parser.parse_args(argv)


def test_env_gives_defaults_and_flags_win() -> None:
    args = parse([], {"X_PORT": "7", "X_MODE": "b", "X_LOUD": "yes", "X_GRACE_S": "2.5"})
    assert (args.port, args.mode, args.loud, args.grace_s) == (7, "b", True, 2.5)
    args = parse(["--port", "8", "--mode", "a"], {"X_PORT": "7", "X_MODE": "b", "X_LOUD": "0"})
    assert (args.port, args.mode, args.loud) == (8, "a", False)
    assert parse([], {"X_PORT": "", "X_LOUD": " "}).port == 50051  # empty means unset


@pytest.mark.parametrize(
    ("environ", "said"),
    [
        ({"X_PORT": "abc"}, "X_PORT='abc': invalid literal for int() with base 10: 'abc' (--port)"),
        ({"X_MODE": "c"}, "X_MODE='c': choose from a, b (--mode)"),
        ({"X_LOUD": "maybe"}, "X_LOUD='maybe': give one of 1, true, yes, on, 0, false, no, off (--loud)"),
    ],
)
def test_a_bad_env_value_is_one_line_naming_the_variable(
    environ: dict[str, str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        parse([], environ)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == f"prog: error: {said}"
    assert "Traceback" not in err


def test_a_secret_comes_from_the_first_source_set(tmp_path: Path) -> None:
    (tmp_path / "file").write_text(" from-file \n")
    (tmp_path / "env-file").write_text("from-env-file\n")
    files = {"X_TOKEN_FILE": str(tmp_path / "env-file")}
    assert secret(parse(["--token", "flag"], {}), TOKEN, {"X_TOKEN": "env"}) == "flag"
    assert (
        secret(parse(["--token-file", str(tmp_path / "file")], {}), TOKEN, {"X_TOKEN": "env"}) == "from-file"
    )
    assert secret(parse([], {}), TOKEN, {"X_TOKEN": " env ", **files}) == "env"
    assert secret(parse([], {}), TOKEN, files) == "from-env-file"
    assert secret(parse([], {}), TOKEN, {}) is None
    with pytest.raises(ValueError, match="not both"):
        secret(parse(["--token", "a", "--token-file", str(tmp_path / "file")], {}), TOKEN, {})


def test_help_says_each_env_var_and_default() -> None:
    parser = argparse.ArgumentParser(prog="prog")
    add_flags(parser, [*FLAGS, TOKEN], {})
    text = " ".join(parser.format_help().split())
    assert "port to listen on (env X_PORT, default 50051)" in text
    assert "seconds (env X_GRACE_S, default 10)" in text
    assert "say more (env X_LOUD)" in text
    assert "the token (env X_TOKEN)" in text and "(env X_TOKEN_FILE)" in text


@pytest.mark.parametrize(
    ("module", "variable", "flag"),
    [
        ("imgsearch", "IMGSEARCH_TIMEOUT_S", "--timeout-s"),
        ("index_service", "IMGSEARCH_MAX_K", "--max-k"),
        ("encoder_service", "IMGSEARCH_ENCODER_MAX_BATCH", "--max-batch"),
        ("web", "IMGSEARCH_WEB_PORT", "--port"),
    ],
)
def test_every_entry_point_says_a_bad_env_value_in_one_line(module: str, variable: str, flag: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", module, *(["stats"] if module == "imgsearch" else [])],
        env={"PATH": "/usr/bin:/bin", variable: "abc"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"{variable}='abc'" in result.stderr and f"({flag})" in result.stderr

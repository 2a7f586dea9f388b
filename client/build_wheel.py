"""Builds the client-only wheel, imgsearch-client: client/pyproject.toml with a copy of imgsearch/ (the
generated stubs in imgsearch/v1 included: `make proto` first) and README.md, staged in a temporary folder,
then `pip wheel --no-deps --no-build-isolation` on it (nothing downloaded: setuptools must be installed).

    python client/build_wheel.py [--wheel-dir dist]

`make client-wheel` runs it; so do the Dockerfile's builder stage and tests/system/test_packaging.py.
Prints the wheel's path. Standard library only.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

CLIENT = Path(__file__).resolve().parent
ROOT = CLIENT.parent
PACKAGE = "imgsearch"
STUBS = ROOT / PACKAGE / "v1" / "__init__.py"


def stage(folder: Path) -> None:
    """Copies the client's pyproject.toml, README.md and the imgsearch package into `folder`."""
    shutil.copy2(CLIENT / "pyproject.toml", folder / "pyproject.toml")
    shutil.copy2(ROOT / "README.md", folder / "README.md")
    shutil.copytree(ROOT / PACKAGE, folder / PACKAGE, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def build(wheel_dir: Path) -> Path:
    """Builds the wheel into `wheel_dir` (created if missing); returns its path."""
    if not STUBS.is_file():
        raise SystemExit(f"{STUBS.relative_to(ROOT)} is missing: generate the gRPC stubs first (make proto)")
    wheel_dir = wheel_dir.resolve()
    wheel_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="imgsearch-client-") as temporary:
        staged = Path(temporary)
        stage(staged)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--quiet",
                "--no-deps",
                "--no-build-isolation",
                "--wheel-dir",
                str(wheel_dir),
                str(staged),
            ],
            check=True,
        )
    version = tomllib.loads((CLIENT / "pyproject.toml").read_text())["project"]["version"]
    wheel = wheel_dir / f"imgsearch_client-{version}-py3-none-any.whl"
    if not wheel.is_file():
        raise SystemExit(f"pip built no {wheel.name} in {wheel_dir}")
    return wheel


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0] if __doc__ else None)
    parser.add_argument("--wheel-dir", type=Path, default=ROOT / "dist", help="where the wheel goes [dist]")
    args = parser.parse_args(argv)
    print(build(args.wheel_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())

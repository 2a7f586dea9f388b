"""The client-only distribution, imgsearch-client: client/build_wheel.py (what `make client-wheel` and the
Dockerfile's builder stage run) builds a wheel that holds the SDK, the CLI and the gRPC stubs, and none of
the servers, the gateway, the tools or the models; its dependencies are the project's base ones and its
`client` extra's, so installing it brings neither TensorFlow nor FAISS nor FastAPI."""

from __future__ import annotations

import email
import re
import subprocess
import sys
import tomllib
import zipfile
from fnmatch import fnmatch
from pathlib import Path

import pytest

from tests.support import ROOT

CLIENT_PYPROJECT = ROOT / "client" / "pyproject.toml"
BUILD_SCRIPT = ROOT / "client" / "build_wheel.py"
NOT_IN_THE_CLIENT = ("encoder_service/", "index_service/", "imgsearch_server/", "web/", "tools/", "bench/")
MODELS = ("*.tflite", "*.keras", "*.npz", "*.h5")
VERSION = tomllib.loads(CLIENT_PYPROJECT.read_text())["project"]["version"]
DIST_INFO = f"imgsearch_client-{VERSION}.dist-info"
HEAVY = {"tensorflow", "keras", "faiss-cpu", "faiss", "ai-edge-litert", "fastapi", "uvicorn", "pymilvus"}


def name_of(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


@pytest.fixture(scope="module")
def client_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("client-wheel")
    result = subprocess.run(
        [sys.executable, str(BUILD_SCRIPT), "--wheel-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    wheel = Path(result.stdout.strip().splitlines()[-1])
    assert wheel.parent == out and wheel.is_file(), result.stdout
    return wheel


def test_the_client_wheel_holds_the_client_and_its_stubs(client_wheel: Path) -> None:
    names = zipfile.ZipFile(client_wheel).namelist()
    for wanted in ("imgsearch/cli.py", "imgsearch/client.py", "imgsearch/__main__.py", "imgsearch/py.typed"):
        assert wanted in names, wanted
    stubs = {name for name in names if fnmatch(name, "imgsearch/v1/*_pb2.py")}
    assert {f"imgsearch/v1/{proto}_pb2.py" for proto in ("encoder", "index", "vectors")} <= stubs
    assert "imgsearch/v1/__init__.py" in names and "imgsearch/v1/index_pb2_grpc.py" in names


def test_the_client_wheel_carries_no_server_and_no_model(client_wheel: Path) -> None:
    names = zipfile.ZipFile(client_wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert top == {"imgsearch", DIST_INFO}, top
    assert not [name for name in names if name.startswith(NOT_IN_THE_CLIENT)]
    assert not [name for name in names if any(fnmatch(name, pattern) for pattern in MODELS)]
    assert not [name for name in names if "__pycache__" in name or name.endswith(".pyc")]
    assert client_wheel.stat().st_size < 1_000_000, "no models: tens of kB"


def test_the_client_wheel_requires_neither_tensorflow_nor_faiss_nor_fastapi(client_wheel: Path) -> None:
    with zipfile.ZipFile(client_wheel) as wheel:
        metadata = email.message_from_bytes(wheel.read(f"{DIST_INFO}/METADATA"))
        entry_points = wheel.read(f"{DIST_INFO}/entry_points.txt").decode()
    assert metadata["Name"] == "imgsearch-client"
    requires = metadata.get_all("Requires-Dist") or []
    names = {name_of(requirement) for requirement in requires}
    assert {"grpcio", "protobuf", "numpy", "pillow", "tqdm", "matplotlib"} <= names
    assert not names & HEAVY, names & HEAVY
    assert not [requirement for requirement in requires if "extra ==" in requirement], "no extras"
    # the one command; train, web and eval --suite come with the full distribution's entry points
    assert "imgsearch = imgsearch.cli:main" in entry_points
    assert "imgsearch.commands" not in entry_points and "encoder_service" not in entry_points


def test_the_client_distribution_follows_the_projects() -> None:
    """client/pyproject.toml keeps ../pyproject.toml's version and Python, and its dependencies are the
    base ones and the `client` extra's, pinned the same."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    client = tomllib.loads(CLIENT_PYPROJECT.read_text())["project"]
    assert client["name"] == "imgsearch-client"
    assert client["version"] == project["version"]
    assert client["requires-python"] == project["requires-python"]
    expected = [*project["dependencies"], *project["optional-dependencies"]["client"]]
    assert sorted(client["dependencies"]) == sorted(expected)
    assert client["scripts"] == {"imgsearch": project["scripts"]["imgsearch"]}

"""TLS and bearer tokens on both services, with certificates made here (trustme) and real servers."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from encoder_service.service import EncoderService
from encoder_service.service import parse_config as encoder_config
from imgsearch import security
from imgsearch.client import EncoderClient, ImageSearch, IndexClient, ServiceError
from imgsearch_server import auth, healthcheck
from imgsearch_server.serving import describe
from index_service.service import IndexService
from index_service.service import parse_config as index_config
from tests.support import mnist_sample, serve, start_encoder, start_index
from tools.local import ServiceProcess, free_port

TOKEN = "s3cret-token-for-tests"


@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA that signed `cert`: what clients trust
    cert: Path  # for localhost, 127.0.0.1 and `encoder`
    key: Path
    other_ca: Path  # a CA that signed nothing here
    other_key: Path  # a key that is not `cert`'s


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    issued = ca.issue_cert("localhost", "127.0.0.1", "encoder")
    pki = Pki(*(root / name for name in ("ca.pem", "cert.pem", "key.pem", "other-ca.pem", "other-key.pem")))
    ca.cert_pem.write_to_path(str(pki.ca))
    pki.cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(pki.key))
    other = trustme.CA()
    other.cert_pem.write_to_path(str(pki.other_ca))
    other.issue_cert("localhost").private_key_pem.write_to_path(str(pki.other_key))
    return pki


def tls_flags(pki: Pki) -> list[str]:
    return ["--tls-cert", str(pki.cert), "--tls-key", str(pki.key)]


@pytest.fixture(scope="module")
def encoder(pki: Pki) -> Iterator[EncoderService]:
    yield from serve(start_encoder(*tls_flags(pki), "--auth-token", TOKEN))


@pytest.fixture(scope="module")
def index(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[IndexService]:
    root = tmp_path_factory.mktemp("secure-index")
    (root / "token").write_text(f"  {TOKEN}\n")  # a secret file's whitespace is stripped
    yield from serve(start_index(root / "data", *tls_flags(pki), "--auth-token-file", str(root / "token")))


def address(service: EncoderService | IndexService) -> str:
    return f"127.0.0.1:{service.server.port}"


def call(service: EncoderService | IndexService, pki: Pki, token: str | None) -> None:
    """One data call through the SDK: Info on the encoder, Stats on the index."""
    if isinstance(service, EncoderService):
        with_encoder = EncoderClient(address(service), timeout_s=5, tls_ca=pki.ca, token=token)
        try:
            assert with_encoder.info()["dim"] == 128
        finally:
            with_encoder.close()
        return
    with_index = IndexClient(address(service), timeout_s=5, tls_ca=pki.ca, token=token)
    try:
        assert with_index.stats().count >= 0
    finally:
        with_index.close()


@pytest.fixture(params=["encoder", "index"])
def service(request: pytest.FixtureRequest) -> EncoderService | IndexService:
    found = request.getfixturevalue(request.param)
    assert isinstance(found, EncoderService | IndexService)
    return found


def test_the_right_token_over_tls_gets_in(service: EncoderService | IndexService, pki: Pki) -> None:
    call(service, pki, TOKEN)


@pytest.mark.parametrize(
    "token,words", [(None, "missing bearer token"), ("wrong", "invalid token"), (TOKEN[:-1], "invalid token")]
)
def test_a_missing_or_wrong_token_is_unauthenticated(
    service: EncoderService | IndexService, pki: Pki, token: str | None, words: str
) -> None:
    with pytest.raises(ServiceError) as caught:
        call(service, pki, token)
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert caught.value.details == words and TOKEN not in str(caught.value)


def raw_health(target: str, ca: Path | None) -> int:
    """Returns the health status from a channel without retries, so a refused handshake fails at once."""
    credentials = security.channel_credentials(ca) if ca else None
    channel = grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return int(stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status)


def test_health_is_open_without_a_token(service: EncoderService | IndexService, pki: Pki) -> None:
    assert raw_health(address(service), pki.ca) == health_pb2.HealthCheckResponse.SERVING
    assert healthcheck.check(address(service), tls_ca=pki.ca) is None


@pytest.mark.parametrize("trusted", ["nothing", "another CA"])
def test_tls_needs_the_ca(service: EncoderService | IndexService, pki: Pki, trusted: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        raw_health(address(service), None if trusted == "nothing" else pki.other_ca)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]


def test_the_sdk_without_the_ca_cannot_reach_a_tls_service(encoder: EncoderService) -> None:
    client = EncoderClient(address(encoder), timeout_s=3, token=TOKEN)
    with pytest.raises(ServiceError, match="not reachable") as caught:
        client.info()
    client.close()
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE


def test_a_streaming_method_needs_the_token_too(index: IndexService, pki: Pki) -> None:
    """Server reflection is stream-stream: the refusal must fit that shape and not leak the schema."""
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    with grpc.secure_channel(address(index), security.channel_credentials(pki.ca)) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.ServerReflectionInfo(iter([request]), timeout=5))
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
        metadata = security.call_metadata(TOKEN)
        (reply,) = stub.ServerReflectionInfo(iter([request]), timeout=5, metadata=metadata)
    assert "imgsearch.v1.Index" in {s.name for s in reply.list_services_response.service}


def test_image_search_over_tls_with_a_token(encoder: EncoderService, index: IndexService, pki: Pki) -> None:
    x, _ = mnist_sample(5)
    with ImageSearch(address(encoder), address(index), 10, tls_ca=pki.ca, token=TOKEN) as search:
        search.add([f"d{n}" for n in range(5)], list(x), [{"label": "d"}] * 5)
        (matches,) = search.search([x[2]], k=1)
    assert matches[0].id == "d2" and matches[0].distance < 1e-5


def test_bearer_scheme_is_parsed_strictly() -> None:
    guard = auth.BearerTokenInterceptor(TOKEN)
    assert guard.check([("authorization", f"Bearer {TOKEN}")]) is None
    assert guard.check([("authorization", f"bearer {TOKEN}")]) is None  # the scheme is case-insensitive
    assert guard.check(None) == "missing bearer token"
    assert guard.check([("authorization", "Bearer ")]) == "missing bearer token"
    assert guard.check([("authorization", f"Basic {TOKEN}")]) == "missing bearer token"
    assert guard.check([("authorization", "Bearer ünïcode")]) == "invalid token"
    with pytest.raises(ValueError):
        auth.BearerTokenInterceptor("")


# Settings: fail fast with one line; empty means off; the token is never logged.


def test_tls_needs_both_files(pki: Pki) -> None:
    with pytest.raises(SystemExit) as caught:
        encoder_config(["--tls-cert", str(pki.cert)])
    message = str(caught.value)
    assert "--tls-cert and --tls-key" in message and "\n" not in message
    with pytest.raises(SystemExit, match="do not make a pair"):
        encoder_config(["--tls-cert", str(pki.cert), "--tls-key", str(pki.other_key)])
    with pytest.raises(SystemExit, match="holds no PEM PRIVATE KEY"):
        encoder_config(["--tls-cert", str(pki.cert), "--tls-key", str(pki.ca)])
    with pytest.raises(SystemExit, match="cannot read the TLS key"):
        index_config(["--tls-cert", str(pki.cert), "--tls-key", str(pki.key) + ".missing"])


def test_one_token_source_and_no_empty_token_file(tmp_path: Path) -> None:
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(SystemExit, match="not both"):
        index_config(["--auth-token", "a", "--auth-token-file", str(tmp_path / "empty")])
    with pytest.raises(SystemExit, match="is empty"):
        index_config(["--auth-token-file", str(tmp_path / "empty")])


def test_empty_env_vars_mean_off(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TLS_CERT", "TLS_KEY", "AUTH_TOKEN", "AUTH_TOKEN_FILE", "MAX_CONCURRENT_RPCS"):
        monkeypatch.setenv(f"IMGSEARCH_{name}", "")
    settings = index_config([]).server
    assert settings.tls_cert is None and settings.tls_key is None and settings.auth_token is None
    assert settings.max_concurrent_rpcs == 64
    assert settings.security_summary() == "plaintext, no auth"


def test_env_turns_both_on_and_the_token_is_never_described(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IMGSEARCH_TLS_CERT", str(pki.cert))
    monkeypatch.setenv("IMGSEARCH_TLS_KEY", str(pki.key))
    monkeypatch.setenv("IMGSEARCH_AUTH_TOKEN", TOKEN)
    config = encoder_config([])
    assert config.server.auth_token is not None and config.server.auth_token.value == TOKEN
    assert config.server.security_summary() == "TLS, bearer token"
    assert TOKEN not in describe(config) and TOKEN not in repr(config)


# As users run it: both services as processes with TLS and a token, the CLI and the Docker probe.


def run(module: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_and_probe_against_tls_and_token_processes(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "token").write_text(TOKEN + "\n")
    encoder = ServiceProcess(
        "encoder_service", free_port(), [*tls_flags(pki), "--auth-token-file", str(tmp_path / "token")]
    )
    index = ServiceProcess("index_service", free_port(), ["--data-dir", str(tmp_path / "data")])
    folder = tmp_path / "digits"
    x, y = mnist_sample(20)
    for n, (digit, label) in enumerate(zip(x, y, strict=True)):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(digit).save(folder / str(label) / f"{n:02d}.png")
    try:
        encoder.start()
        with monkeypatch.context() as env:  # the index takes its settings from the environment
            env.setenv("IMGSEARCH_TLS_CERT", str(pki.cert))
            env.setenv("IMGSEARCH_TLS_KEY", str(pki.key))
            env.setenv("IMGSEARCH_AUTH_TOKEN", TOKEN)
            index.start()
        encoder.wait_healthy(tls_ca=pki.ca)
        index.wait_healthy(tls_ca=pki.ca)
        addresses = {"IMGSEARCH_ENCODER": encoder.address, "IMGSEARCH_INDEX": index.address}
        secure = {**addresses, "IMGSEARCH_TLS_CA": str(pki.ca), "IMGSEARCH_TOKEN": TOKEN}

        result = run("imgsearch", "index", str(folder), "--no-progress", env=secure)
        assert result.returncode == 0, result.stderr
        assert "indexed 20 images; the index now holds 20" in result.stdout
        result = run(
            "imgsearch", "search", str(folder / str(y[3]) / "03.png"), "-k", "1", "--json", env=secure
        )
        assert result.returncode == 0 and f'"id": "{y[3]}/03.png"' in result.stdout, result.stderr

        result = run("imgsearch", "stats", env={**secure, "IMGSEARCH_TOKEN": ""})
        lines = (result.stderr + result.stdout).strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, lines
        assert "UNAUTHENTICATED" in lines[0] and "IMGSEARCH_TOKEN" in lines[0] and TOKEN not in lines[0]

        probe = {"IMGSEARCH_TLS_CA": str(pki.ca), "IMGSEARCH_TLS_SERVER_NAME": "encoder"}
        assert run("imgsearch_server.healthcheck", encoder.address, env=probe).returncode == 0
        refused = run("imgsearch_server.healthcheck", encoder.address, env={"IMGSEARCH_TLS_CA": ""})
        assert refused.returncode == 1 and refused.stderr.count("\n") == 1
    finally:
        index.stop()
        encoder.stop()

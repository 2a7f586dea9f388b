"""The flags that say how to reach the services, shared by the CLI and the web gateway."""

from __future__ import annotations

from imgsearch.client import DEFAULT_ENCODER, DEFAULT_INDEX
from imgsearch.flags import Flag, SecretFlag

ENCODER = Flag(
    "--encoder",
    "encoder address: host:port, dns:///host:port, or a comma list",
    "IMGSEARCH_ENCODER",
    DEFAULT_ENCODER,
)
INDEX = Flag("--index", "index address", "IMGSEARCH_INDEX", DEFAULT_INDEX)
TLS_CA = Flag(
    "--tls-ca",
    "CA certificate (PEM) that signed the services' certificates; turns on TLS",
    "IMGSEARCH_TLS_CA",
)
TOKEN = SecretFlag(
    "--token",
    "IMGSEARCH_TOKEN",
    "bearer token sent on every call; prefer the env var or a file, which `ps` does not show",
)

"""What a gRPC target names: the servers behind `host:port`, `dns:///host:port`, `ipv4:a,b`, a comma list."""

from __future__ import annotations

import ipaddress
import socket


def endpoint_count(address: str) -> int:
    """How many distinct servers an address reaches now (a DNS name of scaled replicas: all of them)."""
    return max(1, len(_endpoints(address)))


def same_service(first: str, second: str) -> bool:
    """Whether two addresses reach the same host and port (names resolved; every loopback and wildcard
    address counts as one), so that `--to` cannot name the index being read by another spelling."""
    return bool(_endpoints(first) & _endpoints(second))


def _endpoints(address: str) -> set[tuple[str, str]]:
    """The (host, port) pairs an address names: `host:port`, `dns:///host:port`, `ipv4:a,b` or a comma
    list, each host as the IP addresses it resolves to. What does not parse is kept as written."""
    text = address.strip().lower()
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if text.startswith(scheme):
            text = text[len(scheme) :]
            break
    found: set[tuple[str, str]] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        host, colon, port = part.rpartition(":")
        if not colon or not port.isdigit():
            found.add((part, ""))
            continue
        host = host.strip("[]")
        try:
            hosts = {info[4][0] for info in socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)}
        except (OSError, UnicodeError, ValueError):
            hosts = {host}
        found.update((_canonical_host(str(h)), port) for h in hosts)
    return found


def _canonical_host(host: str) -> str:
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return "local" if ip.is_loopback or ip.is_unspecified else str(ip)

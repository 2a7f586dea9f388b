"""The container's health probe: `python -m web.healthcheck [URL]` exits 0 when the gateway's /healthz
answers 200 (both services serving), else 1 with one line on stderr. Standard library only."""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence

DEFAULT_URL = "http://127.0.0.1:8080/healthz"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m web.healthcheck", description=__doc__)
    parser.add_argument("url", nargs="?", default=DEFAULT_URL, help=f"default {DEFAULT_URL}")
    parser.add_argument("--timeout-s", type=float, default=4.0)
    args = parser.parse_args(argv)
    try:
        with urllib.request.urlopen(args.url, timeout=args.timeout_s) as reply:
            if reply.status == 200:
                return 0
            problem = f"HTTP {reply.status}"
    except urllib.error.HTTPError as error:
        problem = f"HTTP {error.code}: {error.read(500).decode('utf-8', 'replace')}"
    except (OSError, ValueError) as error:
        problem = str(getattr(error, "reason", error))
    print(f"unhealthy: {args.url}: {problem}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())

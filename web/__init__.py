"""The web gateway: a page to search the collection by upload or drawing, and its JSON API under /api/.

It talks to the encoder and the index over gRPC through the client's Python API (`imgsearch.client`),
like the CLI; it keeps no state of its own. `python -m web` or `imgsearch web` runs it."""

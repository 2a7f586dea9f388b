"""imgsearch: similar-image search over a gRPC encoder service and a gRPC index service."""

__version__ = "0.1.0"

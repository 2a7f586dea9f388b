"""What each failure of a service call becomes over HTTP: a status code and a one-line message."""

from __future__ import annotations

import re

import grpc

from imgsearch.client import BadImage, ModelNotServed, ServiceError

_UNAVAILABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.CANCELLED,
}
_POSITION = re.compile(r"^image \d+: ")


def http_error(error: ServiceError) -> tuple[int, str]:
    """Returns (HTTP status, message) for a failed call to the encoder or the index."""
    if isinstance(error, BadImage):  # the uploaded file: one image per request, so no position needed
        return 400, f"not an image the encoder can use: {_POSITION.sub('', error.details)}"
    if isinstance(error, ModelNotServed):  # the deployment's fault, not the request's: the collection exists
        return 502, error.details  # names the collection and the model (ImageSearch.embed)
    code = error.code
    if code in _UNAVAILABLE:
        return 503, f"{error}; try again once it is back"
    if code == grpc.StatusCode.NOT_FOUND:
        return 404, error.details or "not found"
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE):
        return 400, error.details
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return 409, error.details
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return 502, f"{error}; the gateway needs the services' token (IMGSEARCH_TOKEN)"
    if code == grpc.StatusCode.PERMISSION_DENIED:  # a read-only token (the services' --read-token) wrote
        return 502, f"{error}; adding images needs the services' full token, not their read-only one"
    return 502, str(error)

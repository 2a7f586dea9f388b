"""Model input shapes: `HxWxC` as `imgsearch train --input-shape` takes it, and what the architectures
can be built for. No TensorFlow here: the CLI checks a shape before anything heavy is imported."""

from __future__ import annotations

import re

DEFAULT_INPUT_SHAPE: tuple[int, int, int] = (28, 28, 1)
MIN_SIDE, MAX_SIDE = 8, 256
CHANNELS = (1, 3)
_SHAPE = re.compile(r"(\d+)x(\d+)x(\d+)\Z")


def check_input_shape(shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """The shape itself, or ValueError saying what the autoencoders can take: sides of 8 to 256 pixels,
    each a multiple of 4 (the encoder halves them three times, the decoder doubles back twice from a
    quarter), and 1 (gray) or 3 (RGB) channels."""
    height, width, channels = shape
    for name, side in (("height", height), ("width", width)):
        if not MIN_SIDE <= side <= MAX_SIDE or side % 4:
            raise ValueError(
                f"input {name} {side}: must be {MIN_SIDE} to {MAX_SIDE} pixels and a multiple of 4 "
                "(e.g. 28x28x1, 32x32x3, 64x64x3)"
            )
    if channels not in CHANNELS:
        raise ValueError(f"input channels {channels}: must be 1 (gray) or 3 (RGB)")
    return shape


def parse_input_shape(text: str) -> tuple[int, int, int]:
    """`32x32x3` as (32, 32, 3); ValueError with the form expected and the limits."""
    found = _SHAPE.match(text.strip().lower())
    if found is None:
        raise ValueError(f"--input-shape {text!r}: expected HEIGHTxWIDTHxCHANNELS, e.g. 32x32x3")
    height, width, channels = (int(group) for group in found.groups())
    try:
        return check_input_shape((height, width, channels))
    except ValueError as error:
        raise ValueError(f"--input-shape {text!r}: {error}") from None

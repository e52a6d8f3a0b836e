# Types of the C module nerve/observe/_speedups.c (optional: see hatch_build.py).
from collections.abc import Callable
from typing import Any

ABI: int

def parse_traceparent(value: object, /) -> tuple[int, int, int, str, bool] | None: ...
def encode_span(
    span: Any,
    head: bytes,
    prefixes: tuple[bytes, ...],
    other_value: Callable[[bytes, Any], bytes],
    /,
) -> bytes: ...

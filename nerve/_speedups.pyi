# Types of the C module nerve/_speedups.c (optional: see hatch_build.py, nerve/_native.py).
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
def encode_spans(
    batch: Any, detailed: Callable[[Any], bytes], other_value: Callable[[bytes, Any], bytes], /
) -> list[bytes]: ...

class SpanWriter:
    def __init__(
        self, detailed: Callable[[Any], bytes], other_value: Callable[[bytes, Any], bytes]
    ) -> None: ...
    def __call__(self, span: Any, /) -> bytes: ...

class MetricsEnd:
    def __init__(
        self, duration: Any, processed: dict[str, int], slow: Callable[..., None]
    ) -> None: ...
    def __call__(
        self, ctx: Any, seconds: float, outcome: str, error: BaseException | None = None, /
    ) -> None: ...

class SpanFields:
    trace_id: int
    span_id: int
    flags: int
    start_time: int
    end_time: int
    parent_id: int
    remote: bool
    recorder: Any
    layout: Any
    values: Any
    state: str
    detailed: bool
    links: Any

def start_span(
    span_type: type[SpanFields],
    recorder: Any,
    layout: Any,
    parent: tuple[int, int, int, str, bool] | None,
    values: Any,
    links: Any,
    /,
) -> Any: ...

class HandleFields:
    span: Any
    _tracing: Any
    _token: Any

class ProcessSpans:
    def __init__(
        self,
        layouts: dict[Any, Any],
        make_layout: Callable[[str, str], Any],
        parsed: dict[str, Any],
        parent_of: Callable[[Any], Any],
        recorder: Any,
        span_type: type[SpanFields],
        handle_type: type[HandleFields],
        tracing: Any,
        var: Any,
        key: str,
        context_type: Any,
        pipeline: Any,
        slow_end: Callable[..., None],
    ) -> None: ...
    def start(self, function: str, event: Any, attempt: int, current: bool, /) -> Any: ...
    def starter(self, function: str, ctx_type: type, /) -> Callable[[Any], None]: ...
    def ender(
        self, count: Callable[..., None] | None, ctx_type: type, /
    ) -> Callable[..., None]: ...
    def create(self, layout: Any, parent: tuple[int, int, int, str, bool] | None, /) -> Any: ...
    def end(
        self, handle: Any, error: BaseException | None = None, outcome: str = ..., /
    ) -> None: ...

def span_traceparent(span: SpanFields, /) -> str: ...
def register_event(event_type: type, /) -> None: ...
def traced_copy(event: Any, traceparent: str, tracestate: str, /) -> Any: ...
def register_decoding(
    reserved: frozenset[str],
    checked: set[str],
    fromisoformat: Callable[[str], Any],
    loads: Callable[[bytes], Any],
    /,
) -> None: ...
def plain_event(attributes: Any, data: Any, /) -> Any: ...
def decode_document(raw: bytes, /) -> Any: ...
def nats_headers(raw: bytes, /) -> dict[str, str]: ...
def extension_names(extra: set[str], attributes: dict[str, Any], /) -> list[str]: ...

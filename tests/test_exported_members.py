"""The public API is exactly what ``nerve.__all__`` says, and every name in it works."""

from __future__ import annotations

import importlib
import inspect

import nerve
import nerve.errors

PUBLIC_API = {
    "App",
    "BrokerUnavailable",
    "Client",
    "Compatibility",
    "ConfigError",
    "Context",
    "DeadLetter",
    "DecodeError",
    "DefinitionError",
    "EmitError",
    "Event",
    "EventType",
    "Function",
    "IncompatibleSchema",
    "InvalidEvent",
    "LeaseLost",
    "NerveError",
    "PayloadTooLarge",
    "Retry",
    "RetryPolicy",
    "Runtime",
    "StoreError",
    "Subscription",
    "TransportError",
    "__version__",
}

HANDLER_SIGNALS = {"Retry", "DeadLetter"}


def test_all_is_the_intended_public_api() -> None:
    assert set(nerve.__all__) == PUBLIC_API
    assert len(nerve.__all__) == len(set(nerve.__all__)), "duplicates in nerve.__all__"
    assert sorted(nerve.__all__) == nerve.__all__, "keep nerve.__all__ sorted"


def test_every_public_name_is_importable() -> None:
    module = importlib.import_module("nerve")
    for name in nerve.__all__:
        assert hasattr(module, name), name
        imported = __import__("nerve", fromlist=[name])  # what `from nerve import name` does
        assert getattr(imported, name) is getattr(module, name)
    assert isinstance(nerve.__version__, str) and nerve.__version__


def test_public_classes_come_from_nerve() -> None:
    for name in nerve.__all__:
        member = getattr(nerve, name)
        if inspect.isclass(member):
            assert member.__module__.startswith("nerve."), (name, member.__module__)
            assert member.__name__ == name


def test_errors_module_exports() -> None:
    for name in nerve.errors.__all__:
        assert inspect.isclass(getattr(nerve.errors, name)), name
        assert name in nerve.__all__, f"{name} is an error but not re-exported by nerve"
    defined = {
        name
        for name, member in vars(nerve.errors).items()
        if inspect.isclass(member)
        and issubclass(member, BaseException)
        and member.__module__ == "nerve.errors"
    }
    assert defined == set(nerve.errors.__all__), "every error class is listed in __all__"


def test_every_error_is_a_nerve_error_except_the_handler_signals() -> None:
    for name in nerve.errors.__all__:
        error = getattr(nerve.errors, name)
        if name in HANDLER_SIGNALS:
            assert not issubclass(error, nerve.NerveError), name
            assert issubclass(error, Exception), name
        else:
            assert issubclass(error, nerve.NerveError), name
    assert set(nerve.errors.__all__) >= HANDLER_SIGNALS


def test_error_tree() -> None:
    from nerve.errors import (
        BrokerUnavailable,
        DecodeError,
        InvalidEvent,
        LeaseLost,
        PayloadTooLarge,
        TransportError,
    )

    assert issubclass(DecodeError, InvalidEvent)
    for error in (BrokerUnavailable, PayloadTooLarge, LeaseLost):
        assert issubclass(error, TransportError)
    too_large = PayloadTooLarge(2_000_000, 1_048_576, "e1")
    assert (too_large.size, too_large.limit, too_large.event_id) == (2_000_000, 1_048_576, "e1")
    assert "e1" in str(too_large) and "1048576" in str(too_large)
    decode_error = DecodeError("time", "bad", b"raw")
    assert (decode_error.attribute, decode_error.reason, decode_error.raw) == (
        "time",
        "bad",
        b"raw",
    )
    assert nerve.Retry(0.5).delay == 0.5 and nerve.Retry().delay is None
    assert nerve.DeadLetter("why").reason == "why"

"""nerve: serverless, event-driven microservices for Python."""

from nerve.app import App, EventType, Function, RetryPolicy, Subscription
from nerve.errors import (
    BrokerUnavailable,
    ConfigError,
    DeadLetter,
    DecodeError,
    DefinitionError,
    EmitError,
    InvalidEvent,
    LeaseLost,
    NerveError,
    PayloadTooLarge,
    Retry,
    StoreError,
    TransportError,
)
from nerve.event import Event
from nerve.runtime import Client, Context, Runtime
from nerve.schema import Compatibility, IncompatibleSchema

__version__ = "0.1.0"

__all__ = [
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
]

"""The serverless runtime: consumer loops, retries, dead letters, idempotency, outbox."""

from nerve.runtime.context import Context
from nerve.runtime.runner import FunctionRunner, FunctionStats
from nerve.runtime.runtime import Client, Runtime, tune_gc

__all__ = ["Client", "Context", "FunctionRunner", "FunctionStats", "Runtime", "tune_gc"]

"""``moto_server`` (SQS + SNS emulated, for ``sqs://`` on this machine) with its SQS
backend made thread-safe.

moto's SQS backend is not thread-safe, while ``moto_server`` handles each request in a
thread: concurrent receives and deletes could hand one message to two consumers or
bring a deleted message back. Here every SQS backend operation runs under one lock,
released while a long poll waits for a send. Nothing else of moto is changed.

    python scripts/moto_server.py [--watch-parent] -H 127.0.0.1 -p 5000

``--watch-parent``: exit when the process that started this one is gone (the test
suite starts it so; a SIGKILLed test run must not leave it behind). The other
arguments are ``moto_server``'s.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from moto.server import main
from moto.sqs import models

lock = threading.RLock()


def locked(method: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        with lock:
            return method(*args, **kwargs)

    return run


for name in (
    "send_message", "send_message_batch", "receive_message", "delete_message",
    "delete_message_batch", "change_message_visibility",
    "change_message_visibility_batch", "purge_queue", "get_queue_attributes",
    "set_queue_attributes", "create_queue", "delete_queue",
):  # fmt: skip
    setattr(models.SQSBackend, name, locked(getattr(models.SQSBackend, name)))

waits = models.Queue.wait_for_messages


def wait_unlocked(self: Any, timeout: Any) -> None:
    # a long poll must not hold the lock while it waits for a send
    saved = lock._release_save()  # type: ignore[attr-defined]
    try:
        waits(self, timeout)
    finally:
        lock._acquire_restore(saved)  # type: ignore[attr-defined]


models.Queue.wait_for_messages = wait_unlocked


def watch_parent() -> None:
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


if __name__ == "__main__":
    args = sys.argv[1:]
    if "--watch-parent" in args:
        args.remove("--watch-parent")
        watch_parent()
    main(args)

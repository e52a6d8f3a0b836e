"""The ``nerve`` command line, in process (CliRunner) and as real processes."""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from nerve import App, Event, Runtime
from nerve.cli import cli, load_app, redact, redact_text
from nerve.transport.sqlite import SqliteTransport

APP_SOURCE = """
import asyncio
import os

from pydantic import BaseModel

from nerve import App, DeadLetter

app = App("cliapp")
not_an_app = 42


@app.event("order.created", key="order_id")
class OrderCreated(BaseModel):
    order_id: str
    qty: int = 1


@app.event("order.poison")
class Poison(BaseModel):
    reason: str


app.store_tables(
    "CREATE TABLE IF NOT EXISTS seen (event_id TEXT PRIMARY KEY, pid INTEGER NOT NULL)"
)


@app.function(consumes=OrderCreated, concurrency=1)
async def record(order, ctx):
    await asyncio.sleep(float(os.environ.get("CLIAPP_DELAY", "0")))
    await ctx.store.execute("INSERT INTO seen VALUES (?, ?)", (ctx.event.id, os.getpid()))


@app.function(consumes=Poison)
async def reject(poison, ctx):
    if not os.environ.get("CLIAPP_HEAL"):
        raise DeadLetter(poison.reason)
"""


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory holding the test app module ``cliapp``; it is the cwd."""
    (tmp_path / "cliapp.py").write_text(APP_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))  # also restores sys.path afterwards
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NERVE_BROKER", raising=False)
    monkeypatch.delenv("NERVE_STORE", raising=False)
    monkeypatch.delenv("CLIAPP_HEAL", raising=False)
    sys.modules.pop("cliapp", None)
    return tmp_path


@pytest.fixture
def broker(project: Path) -> str:
    return f"sqlite:///{project / 'x.db'}"


def nerve(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), env={"COLUMNS": "200"})


def json_of(result: Result) -> Any:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def run_until_idle(app: App, broker_url: str) -> None:
    """Run the App's functions in this process until there is nothing left to do."""

    async def go() -> None:
        async with Runtime(app, broker=broker_url) as rt:
            await rt.wait_idle(timeout=15)

    asyncio.run(go())


def stats(broker_url: str) -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        transport = SqliteTransport(broker_url)
        await transport.start()
        try:
            return {s.group: s for s in await transport.stats()}
        finally:
            await transport.close()

    return asyncio.run(go())


def publish_orders(broker_url: str, count: int, start: int = 0) -> None:
    async def go() -> None:
        transport = SqliteTransport(broker_url)
        await transport.start()
        try:
            await transport.publish(
                [
                    Event(type="order.created", source="/test", data={"order_id": f"o{n}"})
                    for n in range(start, start + count)
                ]
            )
        finally:
            await transport.close()

    asyncio.run(go())


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def assert_one_line_error(result: Result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ---------------------------------------------------------------------------------------
# redact


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("amqp://guest:guest@localhost:5672/", "amqp://guest:***@localhost:5672/"),
        ("redis://:s3cret@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        (
            "postgres://u:p%40ss:word@db/test?sslmode=require",
            "postgres://u:***@db/test?sslmode=require",
        ),
        ("nats://token@host:4222", "nats://token@host:4222"),
        (
            "sqs://host/?access_key=AK&secret_key=SK&region=eu",
            "sqs://host/?access_key=AK&secret_key=***&region=eu",
        ),
        ("kafka://h:9092?sasl_password=pw", "kafka://h:9092?sasl_password=***"),
        (
            "sqlite:///.nerve/nerve.db?visibility_timeout=5",
            "sqlite:///.nerve/nerve.db?visibility_timeout=5",
        ),
        ("memory://", "memory://"),
    ],
)
def test_redact_hides_passwords_and_keeps_the_rest(url: str, shown: str) -> None:
    assert redact(url) == shown


def test_redact_text_redacts_every_url_in_a_message() -> None:
    message = "cannot reach 'amqp://a:pw1@h1/' nor redis://:pw2@h2 (see docs)"
    redacted = redact_text(message)
    assert "pw1" not in redacted and "pw2" not in redacted
    assert redacted == "cannot reach 'amqp://a:***@h1/' nor redis://:***@h2 (see docs)"


def test_errors_never_print_a_password(project: Path) -> None:
    # a scheme with no adapter: the message quotes the URL, redacted
    result = nerve("status", "--broker", "nosuchbroker://guest:hunter2@localhost/")
    assert_one_line_error(result, "nosuchbroker://guest:***@localhost/")
    assert "hunter2" not in result.output
    # a real broker refusing the password: says who was refused, never the password
    result = nerve("status", "--broker", "amqp://guest:hunter2@127.0.0.1:5672/")
    assert result.exit_code == 2
    assert "hunter2" not in result.output
    assert "Traceback" not in result.output


# ---------------------------------------------------------------------------------------
# publish, status, dlq round trip


def test_publish_status_and_dead_letter_round_trip(
    broker: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = load_app("cliapp:app")
    run_until_idle(app, broker)  # declares the groups

    first = nerve("publish", "order.poison", "--data", '{"reason": "bad card"}', "-b", broker)
    second = nerve("publish", "order.poison", "--data", '{"reason": "worse"}', "-b", broker)
    order = nerve(
        "publish", "order.created", "--data", '{"order_id": "o-1"}', "--key", "o-1",
        "--subject", "eu", "--app", "cliapp:app", "--broker", broker,
    )  # fmt: skip
    for result in (first, second, order):
        assert result.exit_code == 0, result.output
        assert len(result.stdout.strip()) == 36  # the event id
    run_until_idle(app, broker)

    rows = {row["function"]: row for row in json_of(nerve("status", "--json", "-b", broker))}
    assert rows["reject"]["dlq"] == 2 and rows["reject"]["dead_lettered"] == 2
    assert rows["record"]["processed"] == 1 and rows["record"]["backlog"] == 0
    table = nerve("status", "--broker", broker)
    assert table.exit_code == 0 and "reject" in table.stdout and "record" in table.stdout

    entries = json_of(nerve("dlq", "list", "--json", "--broker", broker))
    assert [e["function"] for e in entries] == ["reject", "reject"]
    assert {e["event"]["id"] for e in entries} == {first.stdout.strip(), second.stdout.strip()}
    assert entries[0]["reason"] == "dead-letter" and entries[0]["error_type"] == "DeadLetter"
    assert json_of(nerve("dlq", "list", "--function", "record", "--json", "-b", broker)) == []
    listing = nerve("dlq", "list", "--broker", broker)
    assert listing.exit_code == 0 and "bad card" in listing.stdout

    bad = next(e for e in entries if e["event"]["data"]["reason"] == "bad card")
    shown = nerve("dlq", "show", bad["id"], "--broker", broker)
    assert shown.exit_code == 0, shown.output
    for fragment in ("dead-letter", "DeadLetter: bad card", "order.poison", "attempts", "reject"):
        assert fragment in shown.stdout
    assert "traceback" in shown.stdout and "raise DeadLetter" in shown.stdout
    assert json_of(nerve("dlq", "show", bad["id"], "--json", "-b", broker))["id"] == bad["id"]

    replayed = nerve("dlq", "replay", bad["id"], "--broker", broker)
    assert replayed.exit_code == 0 and replayed.stdout.strip() == "replayed 1 dead letter"
    rows = {row["function"]: row for row in json_of(nerve("status", "--json", "-b", broker))}
    assert rows["reject"]["dlq"] == 1 and rows["reject"]["backlog"] == 1
    assert rows["record"]["backlog"] == 0  # replay goes to its own function only

    monkeypatch.setenv("CLIAPP_HEAL", "1")
    run_until_idle(app, broker)
    rows = {row["function"]: row for row in json_of(nerve("status", "--json", "-b", broker))}
    assert rows["reject"]["processed"] == 1 and rows["reject"]["dlq"] == 1

    purged = nerve("dlq", "purge", "--all", "--broker", broker)
    assert purged.exit_code == 0 and purged.stdout.strip() == "purged 1 dead letter"
    assert json_of(nerve("dlq", "list", "--json", "--broker", broker)) == []
    assert nerve("dlq", "replay", "--function", "reject", "-b", broker).stdout.strip() == (
        "replayed 0 dead letters"
    )


def test_publish_without_app_builds_the_event_from_the_options(broker: str) -> None:
    result = nerve(
        "publish", "thing.happened", "--data", "[1, 2]", "--subject", "s1", "--key", "k1",
        "--source", "urn:test", "--broker", broker,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    [line] = nerve(
        "tail", "--from-start", "--limit", "1", "--json", "-b", broker
    ).stdout.splitlines()
    doc = json.loads(line)
    assert doc["id"] == result.stdout.strip()
    assert (doc["type"], doc["source"], doc["subject"]) == ("thing.happened", "urn:test", "s1")
    assert doc["partitionkey"] == "k1" and doc["data"] == [1, 2]


# ---------------------------------------------------------------------------------------
# tail


def test_tail_from_start_filters_and_stops_after_limit(broker: str) -> None:
    for type_name, data in [
        ("order.created", '{"n": 1}'),
        ("user.joined", "{}"),
        ("order.paid", '{"n": 3}'),
    ]:
        assert nerve("publish", type_name, "--data", data, "-b", broker).exit_code == 0

    plain = nerve("tail", "--from-start", "--limit", "2", "--broker", broker)
    assert plain.exit_code == 0, plain.output
    lines = plain.stdout.splitlines()
    assert len(lines) == 2
    assert "order.created" in lines[0] and '{"n":1}' in lines[0]
    assert "user.joined" in lines[1]

    filtered = nerve("tail", "order.*", "--from-start", "--limit", "2", "--json", "-b", broker)
    assert filtered.exit_code == 0, filtered.output
    docs = [json.loads(line) for line in filtered.stdout.splitlines()]
    assert [d["type"] for d in docs] == ["order.created", "order.paid"]
    assert docs[1]["data"] == {"n": 3}


def test_tail_follows_new_events_until_ctrl_c(project: Path, broker: str) -> None:
    tail = subprocess.Popen(
        [sys.executable, "-m", "nerve", "tail", "live.*", "--json", "-b", broker],
        cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env(),
    )  # fmt: skip
    try:
        # tail starts at the newest event: publish until it shows one (bounded).
        deadline = time.monotonic() + 15
        first = b""
        n = 0
        while not first:
            assert time.monotonic() < deadline and tail.poll() is None, "tail showed nothing"
            assert nerve("publish", "other.type", "-b", broker).exit_code == 0
            assert nerve("publish", "live.tick", "--data", str(n), "-b", broker).exit_code == 0
            n += 1
            ready, _, _ = select.select([tail.stdout], [], [], 0.2)
            if ready:
                assert tail.stdout is not None
                first = tail.stdout.readline()
        tail.send_signal(signal.SIGINT)
        out, err = tail.communicate(timeout=10)
    finally:
        if tail.poll() is None:
            tail.kill()
            tail.wait()
    assert tail.returncode == 0, err
    assert b"Traceback" not in err
    ticks = [json.loads(line) for line in [first, *out.splitlines()]]
    assert {t["type"] for t in ticks} == {"live.tick"}
    assert [t["data"] for t in ticks] == sorted(t["data"] for t in ticks)


# ---------------------------------------------------------------------------------------
# one-line errors, exit code 2


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["status", "--broker", "nats2://localhost"], ["no transport for nats2://"]),
        (["publish", "x.y", "--broker", "nerve.db"], ["has no scheme"]),
        (["status", "--broker", "sqlite:///does/not/exist.db"], ["no broker database"]),
        (["dlq", "list", "--broker", "memory://"], ["inside one process"]),
        (["publish", "x.y", "--broker", "sqlite:////dev/null/x.db"], ["cannot open", "--broker"]),
        (["run", "cliapp"], ["is not MODULE:APP"]),
        (["run", "nosuchmodule:app"], ["cannot import module 'nosuchmodule'"]),
        (["run", "cliapp:nope"], ["has no attribute 'nope'", "it defines app"]),
        (["run", "cliapp:not_an_app"], ["is a int, not a nerve.App"]),
        (["run", "cliapp:app", "--function", "nope"], ["no function 'nope'", "record"]),
        (["run", "cliapp:app", "-p", "2", "--broker", "memory://"], ["inside one process"]),
        (["run", "cliapp:app", "-b", "sqlite:////dev/null/x.db"], ["cannot open", "--broker"]),
        (["run", "cliapp:app", "-p", "2", "-b", "sqlite:////dev/null/x.db"], ["cannot open"]),
        (["run", "cliapp:app", "--store", "bogus://x"], ["store URL 'bogus://x'"]),
        (["run", "cliapp:app", "-b", "sqlite:///x.db?visibility_timeout=abc"], ["abc"]),
        (["publish", "order.created", "--data", "{bad", "-b", "{broker}"], ["not valid JSON"]),
        (
            [
                "publish",
                "order.created",
                "--data",
                '{"order_id": "o", "qty": "x"}',
                "--app",
                "cliapp:app",
            ],
            ["invalid data for 'order.created'", "field 'qty'"],
        ),
        (
            ["publish", "order.created", "--data", "[]", "--app", "cliapp:app"],
            ["must be a JSON object"],
        ),
        (
            ["publish", "order.creatd", "--data", "{}", "--app", "cliapp:app"],
            ["did you mean 'order.created'"],
        ),
        (["dlq", "replay", "-b", "{broker}"], ["say which dead letters to replay", "--all"]),
        (["dlq", "purge", "1", "--all", "-b", "{broker}"], ["choose ONE way"]),
        (["dlq", "show", "999", "-b", "{broker}"], ["no dead letter with id '999'"]),
        (["dlq", "replay", "999", "-b", "{broker}"], ["no dead letter with id '999'"]),
        (["dlq", "list", "--function", "nope", "-b", "{broker}"], ["no function named 'nope'"]),
    ],
)
def test_bad_input_gets_one_line_and_exit_code_2(
    broker: str, args: list[str], fragments: list[str]
) -> None:
    if "{broker}" in args:
        run_until_idle(load_app("cliapp:app"), broker)  # the broker exists, with groups
    result = nerve(*[broker if a == "{broker}" else a for a in args])
    assert_one_line_error(result, *fragments)


def test_typer_usage_errors_keep_exit_code_2(project: Path) -> None:
    assert nerve("run", "cliapp:app", "--processes", "0").exit_code == 2
    assert nerve("tail", "--limit", "zero").exit_code == 2
    assert nerve("nonsense").exit_code == 2


def test_a_broken_app_module_is_reported_in_one_line(project: Path) -> None:
    (project / "broken.py").write_text("import nerve\nraise RuntimeError('boom at import')\n")
    assert_one_line_error(nerve("run", "broken:app"), "RuntimeError: boom at import", "broken.py")
    (project / "wrong.py").write_text(
        "from nerve import App\napp = App('w')\n\n@app.function(consumes='nope')\n"
        "async def f(e, ctx):\n    pass\n"
    )
    assert_one_line_error(nerve("run", "wrong:app"), "declares its App wrongly", "'nope'")


# ---------------------------------------------------------------------------------------
# run, as a real process


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NERVE_", "CLIAPP_"))}
    env.update(extra)
    return env


def seen_pids(project: Path) -> list[int]:
    store = project / "store.db"
    if not store.exists():
        return []
    with sqlite3.connect(store, timeout=10) as conn:
        try:
            return [pid for (pid,) in conn.execute("SELECT pid FROM seen")]
        except sqlite3.OperationalError:  # the table is not created yet
            return []


def children_of(pid: int) -> set[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return {int(p) for p in path.read_text().split()} if path.exists() else set()


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def test_run_serves_until_sigterm_then_exits_0(
    project: Path, broker: str, processes: list[subprocess.Popen[bytes]]
) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "nerve", "run", "cliapp:app", "--broker", broker],
        cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env(),
    )  # fmt: skip
    processes.append(proc)
    wait_for(lambda: "record" in stats(broker) or proc.poll() is not None, 15, "the groups")
    published = nerve("publish", "order.created", "--data", '{"order_id": "o-9"}', "-b", broker)
    assert published.exit_code == 0
    wait_for(lambda: len(seen_pids(project)) == 1, 15, "the event to be handled")
    assert seen_pids(project) == [proc.pid]

    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err.decode()
    log = err.decode()
    assert "Traceback" not in log
    banner = log.splitlines()[0]
    assert "'cliapp'" in banner and "record, reject" in banner and broker in banner


def test_processes_2_share_the_work_and_restart_a_dead_worker(
    project: Path, broker: str, processes: list[subprocess.Popen[bytes]]
) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "nerve", "run", "cliapp:app", "-p", "2", "--broker", broker],
        cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=child_env(CLIAPP_DELAY="0.05"),
    )  # fmt: skip
    processes.append(proc)
    wait_for(lambda: len(children_of(proc.pid)) == 2, 15, "two worker processes")
    workers = children_of(proc.pid)
    wait_for(lambda: "record" in stats(broker), 15, "the groups")

    # Keep work coming until both workers have taken some (bounded): a worker that
    # starts late under load still gets its share of a growing backlog.
    published = 0
    deadline = time.monotonic() + 30
    while set(seen_pids(project)) != workers:
        assert time.monotonic() < deadline, f"one worker took everything: {seen_pids(project)}"
        publish_orders(broker, 10, start=published)
        published += 10
        time.sleep(0.2)
    wait_for(lambda: len(seen_pids(project)) == published, 30, "every event to be handled")
    assert set(seen_pids(project)) == workers  # both workers took a share, nothing twice

    victim = min(workers)
    os.kill(victim, signal.SIGKILL)
    wait_for(
        lambda: len(children_of(proc.pid) - {victim}) == 2, 15, "the dead worker to be replaced"
    )

    current = children_of(proc.pid)
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    _, err = proc.communicate(timeout=40)
    log = err.decode()
    assert proc.returncode == 0, log
    assert "died unexpectedly" in log and "restarting in" in log
    assert "Traceback" not in log
    assert all(not Path(f"/proc/{pid}").exists() for pid in current | workers)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")  # a zombie has exited (nobody reaped it yet)


@pytest.mark.skipif(sys.platform != "linux", reason="workers follow their parent via prctl")
def test_workers_stop_when_the_supervisor_is_killed(
    project: Path, broker: str, processes: list[subprocess.Popen[bytes]]
) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "nerve", "run", "cliapp:app", "-p", "2", "--broker", broker],
        cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env(),
    )  # fmt: skip
    processes.append(proc)
    wait_for(lambda: len(children_of(proc.pid)) == 2, 15, "two worker processes")
    workers = children_of(proc.pid)
    proc.kill()
    proc.wait(timeout=10)
    wait_for(lambda: not any(alive(pid) for pid in workers), 20, "orphaned workers to stop")


# ---------------------------------------------------------------------------------------
# demo


def test_demo_passes_its_options_and_exit_code_through(tmp_path: Path) -> None:
    package = tmp_path / "examples" / "shop"
    package.mkdir(parents=True)
    (tmp_path / "examples" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "demo.py").write_text(
        textwrap.dedent(
            """
            import json

            def run(*, orders, rate, processes, broker, store, dashboard):
                with open("called.json", "w") as f:
                    json.dump([orders, rate, processes, broker, store, dashboard], f)
                return 3
            """
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "nerve", "demo", "--orders", "5", "--rate", "2.5", "-p", "2",
         "--broker", "sqlite:///d/b.db", "--dashboard", "127.0.0.1:9001"],
        cwd=tmp_path, capture_output=True, env=child_env(), timeout=30,
    )  # fmt: skip
    assert result.returncode == 3, result.stderr.decode()
    called = json.loads((tmp_path / "called.json").read_text())
    assert called == [5, 2.5, 2, "sqlite:///d/b.db", "sqlite:///d/store.db", "127.0.0.1:9001"]
    result = subprocess.run(
        [sys.executable, "-m", "nerve", "demo", "--no-dashboard"],
        cwd=tmp_path, capture_output=True, env=child_env(), timeout=30,
    )  # fmt: skip
    assert result.returncode == 3, result.stderr.decode()
    assert json.loads((tmp_path / "called.json").read_text())[-1] is None


def test_demo_outside_the_repository_says_where_to_run_it(tmp_path: Path) -> None:
    # An editable install may put the repository on sys.path; an 'examples' package
    # without the shop in the current directory stands in for another project's.
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "__init__.py").write_text("")
    result = subprocess.run(
        [sys.executable, "-m", "nerve", "demo", "--orders", "1"],
        cwd=tmp_path, capture_output=True, env=child_env(), timeout=30,
    )  # fmt: skip
    assert result.returncode == 2
    err = result.stderr.decode()
    assert "repository root" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1

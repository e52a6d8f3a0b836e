"""``python -m benchmarks embedded``: nerve's embedded broker against the sqlite3 floor.

Every measurement uses two processes, as peer frameworks are measured: a consumer
(``nerve run benchmarks.apps:app``, or ``benchmarks.floor consume``) and a producer
(``benchmarks._producer`` / ``benchmarks.floor produce-*``), on a fresh database file
under ``benchmarks/.runs/``. This harness is a third process that only starts,
watches and stops them.

- throughput: N events published in batches; events/s = N / (last ack - first
  publish). The last ack is seen by polling the broker file read-only every ~5 ms
  (``counters.processed`` for nerve, ``acked.n`` for the floor), both incremented in
  the transaction that acks.
- latency: open loop at a fixed rate; per event, handler start minus scheduled send
  time; p50/p99/p99.9/max.

Each workload runs ``--runs`` times; the report gives the median and the min-max.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import signal
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import orjson
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
RUNS_DIR = ROOT / "benchmarks" / ".runs"
RESULTS_DIR = ROOT / "benchmarks" / "results"
PYTHON = sys.executable

READY_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
POLL_EVERY = 0.005


@dataclass
class Settings:
    events: int = 20_000
    batch: int = 100
    rate: float = 1000.0
    seconds: float = 10.0
    runs: int = 3
    synchronous: str = "FULL"
    floor_claim: str = "lease"
    floor_busy: str = "spin"
    processes: int = 1  # nerve worker processes (`nerve run --processes`)
    consumer: str = ""  # filled in: the command that runs the nerve consumer

    @property
    def latency_events(self) -> int:
        return int(self.rate * self.seconds)


@dataclass
class Series:
    """One workload on one system: a value (or several) per run."""

    system: str
    workload: str
    runs: list[dict[str, float]] = field(default_factory=list)

    def stat(self, key: str) -> tuple[float, float, float]:
        values = [run[key] for run in self.runs]
        return statistics.median(values), min(values), max(values)


# ---------------------------------------------------------------------------------------
# Processes


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def nerve_cli_available() -> bool:
    """Does ``python -m nerve run`` exist yet (it is another helper's work)?"""
    try:
        done = subprocess.run(
            [PYTHON, "-m", "nerve", "run", "--help"],
            capture_output=True,
            timeout=60,
            cwd=ROOT,
            env=_env(),
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0 and b"--broker" in done.stdout


def nerve_consumer_cmd(target: str, broker: str, use_cli: bool) -> list[str]:
    if use_cli:
        return [PYTHON, "-m", "nerve", "run", target, "--broker", broker, *_no_http()]
    return [PYTHON, "-m", "benchmarks._consumer", target, broker]


@functools.cache
def _no_http() -> tuple[str, ...]:
    """``--no-http`` where ``nerve run`` has it: the HTTP edge is not what is measured,
    and its fixed default port would clash between runs and with other work."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            [PYTHON, "-m", "nerve", "run", "--help"],
            capture_output=True, timeout=60, cwd=ROOT, env=_env(), check=False,
        )  # fmt: skip
        if b"--no-http" in done.stdout:
            return ("--no-http",)
    return ()


@contextlib.contextmanager
def process(
    cmd: list[str], logdir: Path, name: str, **env: str
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``cmd`` for the duration of the block; SIGTERM it after, kill if it hangs."""
    out = (logdir / f"{name}.out").open("wb")
    err = (logdir / f"{name}.err").open("wb")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(**env), stdout=out, stderr=err)
    try:
        yield proc
    finally:
        stop(proc)
        out.close()
        err.close()


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _fail(message: str, logdir: Path) -> RuntimeError:
    tails = []
    for log in sorted(logdir.glob("*.err")):
        text = log.read_text(errors="replace").strip()
        if text:
            tails.append(f"--- {log.name}\n{text[-2000:]}")
    return RuntimeError("\n".join([message, *tails]))


def read_only(path: Path, deadline: float) -> sqlite3.Connection:
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} was not created")
        time.sleep(0.01)
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)


def scalar(conn: sqlite3.Connection, sql: str, params: tuple[Any, ...] = ()) -> int:
    try:
        row = conn.execute(sql, params).fetchone()
    except sqlite3.OperationalError:  # table not there yet, or a busy moment
        return -1
    return -1 if row is None or row[0] is None else int(row[0])


def wait_ready(
    conn: sqlite3.Connection, sql: str, proc: subprocess.Popen[bytes], logdir: Path
) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while scalar(conn, sql) < 1:
        if proc.poll() is not None:
            raise _fail(f"the consumer exited with code {proc.returncode}", logdir)
        if time.monotonic() > deadline:
            raise _fail(f"the consumer was not ready after {READY_TIMEOUT} s", logdir)
        time.sleep(0.01)
    time.sleep(0.3)  # let its loops start


def wait_count(
    conn: sqlite3.Connection,
    sql: str,
    params: tuple[Any, ...],
    target: int,
    timeout: float,
    procs: list[subprocess.Popen[bytes]],
    logdir: Path,
    progress: Callable[[int], None],
) -> float:
    """Poll ``sql`` every ~5 ms until it reaches ``target``; return that wall time."""
    deadline = time.monotonic() + timeout
    last_shown = 0.0
    while True:
        value = scalar(conn, sql, params)
        now = time.time()
        if value >= target:
            progress(value)
            return now
        if time.monotonic() - last_shown > 0.1:
            progress(max(value, 0))
            last_shown = time.monotonic()
            for proc in procs:
                if proc.poll() not in (None, 0):
                    raise _fail(f"a process exited with code {proc.returncode}", logdir)
        if time.monotonic() > deadline:
            raise _fail(f"only {value} of {target} acked after {timeout:.0f} s", logdir)
        time.sleep(POLL_EVERY)


def producer_result(proc: subprocess.Popen[bytes], logdir: Path, name: str) -> dict[str, float]:
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise _fail("the producer did not finish", logdir) from None
    if proc.returncode != 0:
        raise _fail(f"the producer exited with code {proc.returncode}", logdir)
    lines = (logdir / f"{name}.out").read_bytes().strip().splitlines()
    result: dict[str, float] = orjson.loads(lines[-1])
    return result


def wait_file(path: Path, timeout: float, proc: subprocess.Popen[bytes], logdir: Path) -> bytes:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise _fail(f"the consumer exited with code {proc.returncode}", logdir)
        if time.monotonic() > deadline:
            raise _fail(f"{path.name} did not appear within {timeout:.0f} s", logdir)
        time.sleep(0.02)
    return path.read_bytes()


# ---------------------------------------------------------------------------------------
# The four measurements


def percentiles(latencies_s: list[float]) -> dict[str, float]:
    ordered = sorted(latencies_s)
    n = len(ordered)

    def rank(q: float) -> float:  # nearest rank, in milliseconds
        return ordered[min(n - 1, max(0, int(q * n + 0.999999) - 1))] * 1000.0

    return {
        "p50_ms": rank(0.50),
        "p99_ms": rank(0.99),
        "p999_ms": rank(0.999),
        "max_ms": ordered[-1] * 1000.0,
        "mean_ms": statistics.fmean(ordered) * 1000.0,
        "count": float(n),
    }


class Bench:
    def __init__(self, settings: Settings, use_cli: bool, progress: Progress, stamp: str) -> None:
        self.s = settings
        self.use_cli = use_cli
        self.progress = progress
        self.base = RUNS_DIR / stamp

    def _dir(self, name: str) -> Path:
        path = self.base / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _url(self, db: Path) -> str:
        return f"sqlite:///{db}?synchronous={self.s.synchronous}"

    def _task(self, label: str, total: int) -> Callable[[int], None]:
        task = self.progress.add_task(label, total=total)
        return lambda done: self.progress.update(task, completed=done)

    # -- nerve ------------------------------------------------------------------------

    def nerve_throughput(self, run: int) -> dict[str, float]:
        s = self.s
        logdir = self._dir(f"nerve-throughput-{run}")
        db = logdir / "nerve.db"
        url = self._url(db)
        show = self._task(f"nerve throughput #{run}", s.events)
        consumer_cmd = nerve_consumer_cmd("benchmarks.apps:app", url, self.use_cli)
        if s.processes > 1:
            consumer_cmd += ["--processes", str(s.processes)]
        with process(consumer_cmd, logdir, "consumer") as consumer:
            conn = read_only(db, time.monotonic() + READY_TIMEOUT)
            try:
                wait_ready(conn, "SELECT count(*) FROM counters", consumer, logdir)
                with process(self._producer_cmd(url), logdir, "producer") as producer:
                    done_at = wait_count(
                        conn,
                        "SELECT processed FROM counters WHERE grp = ?",
                        ("sink",),
                        s.events,
                        120,
                        [consumer, producer],
                        logdir,
                        show,
                    )
                    sent = producer_result(producer, logdir, "producer")
            finally:
                conn.close()
        return throughput_result(s.events, sent, done_at)

    def _producer_cmd(self, url: str) -> list[str]:
        """The nerve producer of the throughput workload: N events, in batches."""
        s = self.s
        return [
            PYTHON, "-m", "benchmarks._producer", "throughput", url,
            str(s.events), str(s.batch),
        ]  # fmt: skip

    def nerve_drain(self, run: int) -> dict[str, float]:
        """A backlog drained, the producer not running: what the worker processes
        (``processes``) handle when nothing else competes for the machine. The group is
        declared by a first consumer, stopped; N events are published; then the
        consumer starts. Events/s from the first ack seen to the last (its start-up
        is not timed: ``(N - acked at the first look) / seconds``). A backlog acked
        whole before a look could start that clock (it fit in flight at once: a few
        hundred events, several processes) is timed from the consumer's start instead,
        start-up included, rather than reported as 0 events/s."""
        s = self.s
        logdir = self._dir(f"nerve-drain-{run}")
        db = logdir / "nerve.db"
        url = self._url(db)
        consumer_cmd = nerve_consumer_cmd("benchmarks.apps:app", url, self.use_cli)
        with process(consumer_cmd, logdir, "declare") as consumer:
            conn = read_only(db, time.monotonic() + READY_TIMEOUT)
            try:
                wait_ready(conn, "SELECT count(*) FROM counters", consumer, logdir)
            finally:
                conn.close()
        with process(self._producer_cmd(url), logdir, "producer") as producer:
            producer_result(producer, logdir, "producer")
        if s.processes > 1:
            consumer_cmd += ["--processes", str(s.processes)]
        show = self._task(f"nerve drain x{s.processes} #{run}", s.events)
        sql = "SELECT processed FROM counters WHERE grp = ?"
        launched = time.time()
        with process(consumer_cmd, logdir, "consumer") as consumer:
            conn = read_only(db, time.monotonic() + READY_TIMEOUT)
            try:  # the clock starts at the first look that sees an ack (start-up is not timed)
                wait_count(conn, sql, ("sink",), 1, READY_TIMEOUT, [consumer], logdir, show)
                first = scalar(conn, sql, ("sink",))
                start = time.time()
                end = wait_count(conn, sql, ("sink",), s.events, 120, [consumer], logdir, show)
            finally:
                conn.close()
        if first >= s.events:  # all acked at the first look: nothing left to time
            start, first = launched, 0
        return {"events_per_s": (s.events - first) / (end - start), "seconds": end - start}

    def nerve_latency(self, run: int) -> dict[str, float]:
        s = self.s
        logdir = self._dir(f"nerve-latency-{run}")
        db = logdir / "nerve.db"
        url = self._url(db)
        out = logdir / "latencies.json"
        show = self._task(f"nerve latency #{run}", s.latency_events)
        consumer_cmd = nerve_consumer_cmd("benchmarks.apps:latency_app", url, self.use_cli)
        env = {"NERVE_BENCH_OUT": str(out), "NERVE_BENCH_EXPECT": str(s.latency_events)}
        with process(consumer_cmd, logdir, "consumer", **env) as consumer:
            conn = read_only(db, time.monotonic() + READY_TIMEOUT)
            try:
                wait_ready(conn, "SELECT count(*) FROM counters", consumer, logdir)
                producer_cmd = [
                    PYTHON, "-m", "benchmarks._producer", "latency", url,
                    str(s.rate), str(s.seconds),
                ]  # fmt: skip
                with process(producer_cmd, logdir, "producer") as producer:
                    wait_count(
                        conn,
                        "SELECT processed FROM counters WHERE grp = ?",
                        ("probe",),
                        s.latency_events,
                        s.seconds + 60,
                        [consumer, producer],
                        logdir,
                        show,
                    )
                    sent = producer_result(producer, logdir, "producer")
                raw = wait_file(out, 30, consumer, logdir)
            finally:
                conn.close()
        result = percentiles(orjson.loads(raw))
        result["producer_max_behind_ms"] = sent.get("max_behind_s", 0.0) * 1000.0
        return result

    # -- the sqlite3 floor --------------------------------------------------------------

    def _floor_consumer(self, db: Path) -> list[str]:
        return [
            PYTHON, "-m", "benchmarks.floor", "consume", str(db),
            "--synchronous", self.s.synchronous, "--batch", str(self.s.batch),
            "--claim", self.s.floor_claim, "--busy", self.s.floor_busy,
        ]  # fmt: skip

    def floor_throughput(self, run: int) -> dict[str, float]:
        s = self.s
        logdir = self._dir(f"floor-throughput-{run}")
        db = logdir / "floor.db"
        show = self._task(f"floor throughput #{run}", s.events)
        with process(self._floor_consumer(db), logdir, "consumer") as consumer:
            conn = read_only(db, time.monotonic() + READY_TIMEOUT)
            try:
                wait_ready(conn, "SELECT count(*) FROM acked", consumer, logdir)
                producer_cmd = [
                    PYTHON, "-m", "benchmarks.floor", "produce-throughput", str(db),
                    "--synchronous", s.synchronous, "--batch", str(s.batch),
                    "--events", str(s.events), "--busy", s.floor_busy,
                ]  # fmt: skip
                with process(producer_cmd, logdir, "producer") as producer:
                    done_at = wait_count(
                        conn,
                        "SELECT n FROM acked WHERE id = 1",
                        (),
                        s.events,
                        120,
                        [consumer, producer],
                        logdir,
                        show,
                    )
                    sent = producer_result(producer, logdir, "producer")
            finally:
                conn.close()
        return throughput_result(s.events, sent, done_at)

    def floor_latency(self, run: int) -> dict[str, float]:
        s = self.s
        logdir = self._dir(f"floor-latency-{run}")
        db = logdir / "floor.db"
        out = logdir / "latencies.json"
        show = self._task(f"floor latency #{run}", s.latency_events)
        env = {"NERVE_BENCH_OUT": str(out), "NERVE_BENCH_EXPECT": str(s.latency_events)}
        with process(self._floor_consumer(db), logdir, "consumer", **env) as consumer:
            conn = read_only(db, time.monotonic() + READY_TIMEOUT)
            try:
                wait_ready(conn, "SELECT count(*) FROM acked", consumer, logdir)
                producer_cmd = [
                    PYTHON, "-m", "benchmarks.floor", "produce-latency", str(db),
                    "--synchronous", s.synchronous, "--rate", str(s.rate),
                    "--seconds", str(s.seconds), "--busy", s.floor_busy,
                ]  # fmt: skip
                with process(producer_cmd, logdir, "producer") as producer:
                    wait_count(
                        conn,
                        "SELECT n FROM acked WHERE id = 1",
                        (),
                        s.latency_events,
                        s.seconds + 60,
                        [consumer, producer],
                        logdir,
                        show,
                    )
                    sent = producer_result(producer, logdir, "producer")
                raw = wait_file(out, 30, consumer, logdir)
            finally:
                conn.close()
        result = percentiles(orjson.loads(raw))
        result["producer_max_behind_ms"] = sent.get("max_behind_s", 0.0) * 1000.0
        return result


def throughput_result(events: int, sent: dict[str, float], done_at: float) -> dict[str, float]:
    """A throughput run's result: ``events`` from the producer's first publish (``sent``:
    what the producer printed) to the last one handled (wall time ``done_at``)."""
    elapsed = done_at - sent["first_publish"]
    return {
        "events_per_s": events / elapsed,
        "seconds": elapsed,
        "publish_seconds": sent["last_publish"] - sent["first_publish"],
        "first_publish": sent["first_publish"],
        "done_at": done_at,
    }


# ---------------------------------------------------------------------------------------
# What the machine's CPUs did during a run


class ProcessCpu(NamedTuple):
    """A process's CPU seconds so far (user + system, all its threads, and those of
    the children it has waited for) and its parent's pid."""

    seconds: float
    parent: int


def _stat(pid: int | str) -> tuple[str, float, ProcessCpu] | None:
    """A process's command name (``/proc/PID/stat``'s, at most 15 characters), its own
    user + system CPU seconds so far (all its threads), and :class:`ProcessCpu`; None
    where that cannot be read (no such process, no ``/proc``)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        name, _, rest = stat.partition(" (")[2].rpartition(")")
        fields = rest.split()
        tick = os.sysconf("SC_CLK_TCK")
        own = (int(fields[11]) + int(fields[12])) / tick
        reaped = (int(fields[13]) + int(fields[14])) / tick
        return name, own, ProcessCpu(own + reaped, int(fields[1]))
    except (OSError, ValueError, IndexError):
        return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of process ``pid`` so far, all its threads (Linux
    ``/proc``); None where that cannot be read."""
    found = _stat(pid)
    return None if found is None else found[1]


def cpu_by_name(prefixes: tuple[str, ...]) -> dict[int, ProcessCpu]:
    """pid -> :class:`ProcessCpu`, of every process whose command name starts with one
    of ``prefixes``: a broker server and its workers (PostgreSQL runs a backend per
    connection). Empty where ``/proc`` cannot be read, or for no prefix."""
    if not prefixes:
        return {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return {}
    found: dict[int, ProcessCpu] = {}
    for entry in entries:
        if entry.isdigit():
            stat = _stat(entry)  # None: gone meanwhile
            if stat is not None and stat[0].startswith(prefixes):
                found[int(entry)] = stat[2]
    return found


def cpu_since(before: dict[int, ProcessCpu], after: dict[int, ProcessCpu]) -> float:
    """CPU seconds spent between two :func:`cpu_by_name` readings by those processes.

    One started meanwhile counts from zero. One that ended meanwhile counts when a
    process of the second reading waited for it (its time is then in that parent's:
    PostgreSQL's postmaster reaps the backend of a connection closed, such as a
    producer's that finished publishing before the consumer finished); else it is not
    seen."""
    spent = sum(cpu.seconds - before[pid].seconds if pid in before else cpu.seconds
                for pid, cpu in after.items())  # fmt: skip
    return spent - sum(
        cpu.seconds for pid, cpu in before.items() if pid not in after and cpu.parent in after
    )


class CpuSampler:
    """Samples the machine's CPU time (``/proc/stat``) every ``every`` seconds in a
    thread while in use, so that :meth:`cores_busy` can say how many cores were busy
    over a run's timed part (start-up and shutdown left out). On a machine without
    ``/proc/stat`` it records nothing and :meth:`cores_busy` is None."""

    def __init__(self, every: float = 0.02) -> None:
        self._every = every
        self._samples: list[tuple[float, int, int]] = []
        """(wall time, busy jiffies, total jiffies), all CPUs together."""
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    @staticmethod
    def _read() -> tuple[int, int] | None:
        try:
            with open("/proc/stat", "rb") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        total = sum(fields[:8])  # user..steal (guest time is counted in user already)
        return total - idle, total

    def _run(self) -> None:
        while True:
            got = self._read()
            if got is None:
                return
            self._samples.append((time.time(), *got))
            if self._halt.wait(self._every):
                return

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._halt.set()
        self._thread.join(5)

    def cores_busy(self, start: float, end: float) -> float | None:
        """Cores busy on average between wall times ``start`` and ``end`` (from the
        last sample before ``start`` to the first after ``end``)."""
        samples = self._samples
        before = [x for x in samples if x[0] <= start]
        after = [x for x in samples if x[0] >= end]
        if not before or not after or after[0][2] <= before[-1][2]:
            return None
        (_, busy0, total0), (_, busy1, total1) = before[-1], after[0]
        return (busy1 - busy0) / (total1 - total0) * (os.cpu_count() or 1)


# ---------------------------------------------------------------------------------------
# Machine, report, plot


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        import uvloop  # noqa: F401

        has_uvloop = True
    except ImportError:
        has_uvloop = False
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "uvloop": has_uvloop,
        "filesystem_of_runs": _filesystem(RUNS_DIR),
    }


def _filesystem(path: Path) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["df", "-T", str(path)], capture_output=True, text=True, timeout=10, check=False
        ).stdout.splitlines()
        if len(out) > 1:
            fields = out[1].split()
            return f"{fields[1]} ({fields[0]})"
    return "unknown"


def _fmt_rate(series: Series) -> str:
    med, lo, hi = series.stat("events_per_s")
    return f"{med:,.0f} [{lo:,.0f}-{hi:,.0f}]"


def _fmt_ms(series: Series, key: str) -> str:
    med, lo, hi = series.stat(key)
    return f"{med:.2f} [{lo:.2f}-{hi:.2f}]"


def summary_line(results: dict[str, Series]) -> dict[str, float]:
    tp, lat = results["nerve-throughput"], results["nerve-latency"]
    ftp, flat = results["floor-throughput"], results["floor-latency"]
    eps, feps = tp.stat("events_per_s")[0], ftp.stat("events_per_s")[0]
    return {
        "events_per_s": round(eps, 1),
        "p50_ms": round(lat.stat("p50_ms")[0], 3),
        "p99_ms": round(lat.stat("p99_ms")[0], 3),
        "floor_events_per_s": round(feps, 1),
        "floor_p50_ms": round(flat.stat("p50_ms")[0], 3),
        "floor_p99_ms": round(flat.stat("p99_ms")[0], 3),
        "ratio": round(eps / feps, 3),
    }


def results_table(results: dict[str, Series], settings: Settings) -> Table:
    tp, lat = results["nerve-throughput"], results["nerve-latency"]
    ftp, flat = results["floor-throughput"], results["floor-latency"]
    table = Table(
        title=f"Embedded broker, synchronous={settings.synchronous}, "
        f"median \\[min-max] of {settings.runs} run(s)"
    )
    table.add_column("metric")
    table.add_column("nerve", justify="right")
    table.add_column("sqlite3 floor", justify="right")
    table.add_column("nerve/floor", justify="right")
    rows: list[tuple[str, str, str]] = [
        ("throughput, events/s", "events_per_s", ""),
        ("latency p50, ms", "p50_ms", "ms"),
        ("latency p99, ms", "p99_ms", "ms"),
        ("latency p99.9, ms", "p999_ms", "ms"),
        ("latency max, ms", "max_ms", "ms"),
    ]
    for label, key, unit in rows:
        if unit:
            a, b = lat, flat
            cells = (_fmt_ms(a, key), _fmt_ms(b, key))
        else:
            a, b = tp, ftp
            cells = (_fmt_rate(a), _fmt_rate(b))
        ratio = a.stat(key)[0] / b.stat(key)[0] if b.stat(key)[0] else float("nan")
        table.add_row(label, *cells, f"{ratio:.2f}")
    return table


def markdown(
    results: dict[str, Series], settings: Settings, env: dict[str, Any], summary: dict[str, float]
) -> str:
    tp, lat = results["nerve-throughput"], results["nerve-latency"]
    ftp, flat = results["floor-throughput"], results["floor-latency"]
    lines = [
        "# Embedded broker benchmark",
        "",
        f"Run {env['when']} with `python -m benchmarks embedded "
        f"--runs {settings.runs} --events {settings.events} --rate {settings.rate:g} "
        f"--seconds {settings.seconds:g}`.",
        "",
        "## Results (median [min-max])",
        "",
        "| metric | nerve | sqlite3 floor | nerve/floor |",
        "|---|---:|---:|---:|",
        f"| throughput, events/s | {_fmt_rate(tp)} | {_fmt_rate(ftp)} | {summary['ratio']:.2f} |",
    ]
    for label, key in (
        ("latency p50, ms", "p50_ms"),
        ("latency p99, ms", "p99_ms"),
        ("latency p99.9, ms", "p999_ms"),
        ("latency max, ms", "max_ms"),
    ):
        ratio = lat.stat(key)[0] / flat.stat(key)[0] if flat.stat(key)[0] else float("nan")
        lines.append(f"| {label} | {_fmt_ms(lat, key)} | {_fmt_ms(flat, key)} | {ratio:.2f} |")
    lines += [
        "",
        "Targets (from the issue): >= 15,000 events/s end-to-end with synchronous=FULL; "
        "p99 <= 10 ms at a steady 1,000 events/s.",
        "",
        "## Machine",
        "",
        f"- CPU: {env['machine']['cpu']}, {env['machine']['cores']} cores",
        f"- {env['machine']['platform']}; runs on {env['machine']['filesystem_of_runs']}",
        f"- Python {env['machine']['python']}, SQLite {env['machine']['sqlite']}, "
        f"uvloop {'yes' if env['machine']['uvloop'] else 'no'}",
        "- load average (1, 5, 15 min) before: "
        + ", ".join(f"{x:.2f}" for x in env["load_average_1_5_15"]["before"])
        + "; after: "
        + ", ".join(f"{x:.2f}" for x in env["load_average_1_5_15"]["after"])
        + " (other work on the machine skews the numbers; compare runs at low load)",
        "",
        "## Settings",
        "",
        f"- durability: WAL, `synchronous={settings.synchronous}` (broker, store and floor)",
        f"- events: ~{env['event_bytes']} bytes each (encoded structured CloudEvent, "
        "an `order.placed` with 2 line items, keyed by `order_id`)",
        f"- throughput: {settings.events:,} events, published in batches of "
        f"{settings.batch} (`client.publish_events`); one no-op async function "
        "(concurrency 100, the default 30 s timeout); events/s = N / (last ack - first "
        "publish), last ack "
        f"seen by polling the broker file every {POLL_EVERY * 1000:g} ms",
        f"- latency: open loop, {settings.rate:g} events/s for {settings.seconds:g} s, "
        "single-event publishes at send times fixed in advance; latency = handler "
        "start - scheduled send time",
        f"- floor: raw `sqlite3`, same process split, claim batches of {settings.batch}, "
        f"claim mode `{settings.floor_claim}` "
        + (
            "(UPDATE...RETURNING lease, then DELETE = ack: two transactions per batch)"
            if settings.floor_claim == "lease"
            else "(DELETE...RETURNING: claim and ack in one transaction)"
        )
        + (
            "; lock waits retried every 50 us (`busy_timeout=0` + retry loop)"
            if settings.floor_busy == "spin"
            else "; lock waits by SQLite's busy handler (sleeps 1, 2, 5, 10... ms)"
        ),
        f"- nerve consumer: `{settings.consumer}`",
        "",
        "## Summary line",
        "",
        "```json",
        orjson.dumps(summary).decode(),
        "```",
        "",
    ]
    return "\n".join(lines)


def plot(results: dict[str, Series], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    systems = [("nerve", "#3b6ea8"), ("floor", "#9a9a9a")]
    for i, (system, color) in enumerate(systems):
        med, lo, hi = results[f"{system}-throughput"].stat("events_per_s")
        left.bar(i, med, yerr=[[med - lo], [hi - med]], color=color, capsize=6)
    left.set_xticks(range(2), ["nerve", "sqlite3 floor"])
    left.set_ylabel("events/s (median, min-max)")
    left.set_title("Throughput, end to end")
    keys = ["p50_ms", "p99_ms", "p999_ms"]
    width = 0.38
    for i, (system, color) in enumerate(systems):
        series = results[f"{system}-latency"]
        stats = [series.stat(k) for k in keys]
        xs = [j + (i - 0.5) * width for j in range(len(keys))]
        right.bar(
            xs,
            [m for m, _, _ in stats],
            width,
            yerr=[[m - lo for m, lo, _ in stats], [hi - m for m, _, hi in stats]],
            color=color,
            capsize=4,
            label="nerve" if system == "nerve" else "sqlite3 floor",
        )
    right.set_xticks(range(len(keys)), ["p50", "p99", "p99.9"])
    right.set_ylabel("ms")
    right.set_title("Latency, open loop")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------


def run(settings: Settings, console: Console) -> dict[str, float]:
    use_cli = nerve_cli_available()
    settings.consumer = " ".join(
        ["python", *nerve_consumer_cmd("benchmarks.apps:app", "URL", use_cli)[1:]]
    )
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    load_before = os.getloadavg()
    results: dict[str, Series] = {
        name: Series(*name.split("-", 1))
        for name in ("nerve-throughput", "floor-throughput", "nerve-latency", "floor-latency")
    }
    columns = (
        TextColumn("{task.description:<22}"),
        BarColumn(),
        TextColumn("{task.completed:>7,}/{task.total:,}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        bench = Bench(settings, use_cli, progress, stamp)
        for i in range(1, settings.runs + 1):  # interleaved, so drift hits both alike
            results["nerve-throughput"].runs.append(bench.nerve_throughput(i))
            results["floor-throughput"].runs.append(bench.floor_throughput(i))
        for i in range(1, settings.runs + 1):
            results["nerve-latency"].runs.append(bench.nerve_latency(i))
            results["floor-latency"].runs.append(bench.floor_latency(i))
    summary = summary_line(results)
    console.print(results_table(results, settings))

    from benchmarks.apps import make_orders
    from nerve.event import encode

    sizes = [len(encode(e)) for e in make_orders(100)]
    env = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "event_bytes": round(statistics.median(sizes)),
        "load_average_1_5_15": {"before": load_before, "after": os.getloadavg()},
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    doc = {
        "summary": summary,
        "settings": asdict(settings),
        "environment": env,
        "results": {
            name: {
                "system": s.system,
                "workload": s.workload,
                "runs": s.runs,
                "median": {k: s.stat(k)[0] for k in s.runs[0]},
                "min": {k: s.stat(k)[1] for k in s.runs[0]},
                "max": {k: s.stat(k)[2] for k in s.runs[0]},
            }
            for name, s in results.items()
        },
        "targets": {"events_per_s": 15_000, "p99_ms_at_1000_per_s": 10.0},
    }
    (RESULTS_DIR / "embedded.json").write_bytes(
        orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n"
    )
    (RESULTS_DIR / "embedded.md").write_text(markdown(results, settings, env, summary))
    plotted = plot(results, RESULTS_DIR / "embedded.png")
    console.print(
        f"wrote {RESULTS_DIR.relative_to(ROOT)}/embedded.json, embedded.md"
        + (", embedded.png" if plotted else " (no plot: matplotlib is not installed)")
    )
    return summary

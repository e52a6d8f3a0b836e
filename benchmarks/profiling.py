"""``python -m benchmarks embedded --profile``: where the nerve consumer spends its time.

Runs the throughput workload once with ``py-spy record`` attached to the consumer
process (all threads: the event loop and the SQLite worker and watcher threads),
and summarises the folded stacks: the top frames by own time (the frame was on top
of the stack) and by cumulative time (the frame was anywhere on the stack). Idle
threads are not sampled (py-spy's default), so blocking in ``fsync`` inside SQLite
shows up only while the thread is counted as running.
"""

from __future__ import annotations

import linecache
import re
import shutil
import sysconfig
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from benchmarks.embedded import (
    PYTHON,
    READY_TIMEOUT,
    RESULTS_DIR,
    ROOT,
    RUNS_DIR,
    Settings,
    nerve_cli_available,
    nerve_consumer_cmd,
    process,
    producer_result,
    read_only,
    wait_count,
    wait_ready,
)

TOP = 15
_LOCATION = re.compile(r"^(?P<func>.*) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")


def _py_spy() -> str | None:
    here = Path(PYTHON).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


def _short(frame: str, *, line: bool = False) -> str:
    """``func (path/to/file.py:12)`` -> ``func (file.py)``, or ``func (file.py:12)``."""
    match = _LOCATION.match(frame.strip())
    if not match:
        return frame.strip()
    path = match.group("file")
    for marker in ("/site-packages/", "/lib/python3.11/", str(ROOT) + "/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    if line and match.group("line"):
        path += ":" + match.group("line")
    return f"{match.group('func')} ({path})"


def _boilerplate(name: str) -> bool:
    """Frames every sample of a thread goes through (entry points, the event loop)."""
    return any(marker in name for marker in _BOILERPLATE)


_BOILERPLATE = (
    "(threading.py",
    "(<frozen runpy>",
    "(typer/",
    "(click/",
    "(uvloop/__init__.py",
    "(asyncio/runners.py",
    "(asyncio/base_events.py",
    "(asyncio/events.py",
    "nerve/cli.py",
    "nerve/__main__.py",
    "benchmarks/_consumer.py",
    "Worker.start.<locals>.run",
)


def _thread_name(field: str) -> str:
    """``thread (123): nerve-sqlite:/path/x.db`` -> ``nerve-sqlite``."""
    name = field.split(": ", 1)[-1]
    return name.split(":", 1)[0] if name.startswith("nerve-") else name


_WAITS = re.compile(r"\.(get|wait|acquire)\(|\bsleep\(|select\(")


def source_of(frame: str) -> str:
    """The source line a folded frame points at (``''`` when it cannot be read)."""
    match = _LOCATION.match(frame.strip())
    if not match or not match.group("line"):
        return ""
    path = match.group("file")
    paths = sysconfig.get_paths()
    candidates = [path] + [
        str(Path(base) / path) for base in (ROOT, paths["stdlib"], paths["purelib"])
    ]
    for candidate in candidates:
        text = linecache.getline(candidate, int(match.group("line"))).strip()
        if text:
            return text
    return ""


def is_waiting(source: str) -> bool:
    """Blocked on a queue, lock, event or sleep: py-spy does not always call it idle."""
    return bool(_WAITS.search(source))


def _stacks(folded: Path) -> Iterator[tuple[str | None, list[str], int]]:
    """The samples of a folded-stacks file: (thread field or None, frames outermost
    first, count)."""
    for line in folded.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        frames = stack.split(";")
        thread = frames.pop(0) if frames[0].startswith(("process ", "thread ")) else None
        yield thread, frames, int(count_text)


def summarise(folded: Path) -> tuple[int, Counter[str], Counter[str], Counter[str], Counter[str]]:
    """Total samples; own samples per source line; cumulative samples per function
    (entry-point and event-loop frames left out); samples per thread; samples per
    stage (:data:`STAGES`)."""
    own: Counter[str] = Counter()
    cumulative: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    stages: Counter[str] = Counter()
    total = 0
    for thread, frames, count in _stacks(folded):
        if thread is not None:
            threads[_thread_name(thread)] += count
        if not frames:
            continue
        total += count
        own[frames[-1].strip()] += count
        stages[stage_of(frames)] += count
        for name in {_short(f) for f in frames}:
            if not _boilerplate(name):
                cumulative[name] += count
    return total, own, cumulative, threads, stages


def run_profile(settings: Settings, console: Console, rate: int = 250, native: bool = False) -> str:
    spy = _py_spy()
    if spy is None:
        raise SystemExit("py-spy is not installed: pip install py-spy")
    use_cli = nerve_cli_available()
    stamp = time.strftime("%Y%m%dT%H%M%S")
    logdir = RUNS_DIR / stamp / "profile"
    logdir.mkdir(parents=True, exist_ok=True)
    db = logdir / "nerve.db"
    url = f"sqlite:///{db}?synchronous={settings.synchronous}"
    folded = logdir / "consumer.folded"
    columns = (
        TextColumn("{task.description:<22}"),
        BarColumn(),
        TextColumn("{task.completed:>7,}/{task.total:,}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("profiled throughput", total=settings.events)
        consumer_cmd = nerve_consumer_cmd("benchmarks.apps:app", url, use_cli)
        with process(consumer_cmd, logdir, "consumer") as consumer:
            conn = read_only(db, time.monotonic() + READY_TIMEOUT)
            try:
                wait_ready(conn, "SELECT count(*) FROM counters", consumer, logdir)
                spy_cmd = [
                    spy, "record", "--pid", str(consumer.pid), "--rate", str(rate),
                    "--format", "raw", "--threads", "--output", str(folded),
                    *(["--native"] if native else []),
                ]  # fmt: skip
                with process(spy_cmd, logdir, "py-spy") as recorder:
                    time.sleep(1.0)  # py-spy attaches
                    if recorder.poll() is not None:
                        err = (logdir / "py-spy.err").read_text(errors="replace")
                        raise SystemExit(f"py-spy could not attach: {err.strip()[-500:]}")
                    producer_cmd = [
                        PYTHON, "-m", "benchmarks._producer", "throughput", url,
                        str(settings.events), str(settings.batch),
                    ]  # fmt: skip
                    with process(producer_cmd, logdir, "producer") as producer:
                        done_at = wait_count(
                            conn,
                            "SELECT processed FROM counters WHERE grp = ?",
                            ("sink",),
                            settings.events,
                            300,
                            [consumer, producer],
                            logdir,
                            lambda n: progress.update(task, completed=n),
                        )
                        sent = producer_result(producer, logdir, "producer")
                    # SIGINT makes py-spy write its output (leaving the block sends SIGTERM)
                    recorder.send_signal(2)
                    recorder.wait(30)
            finally:
                conn.close()
    eps = settings.events / (done_at - sent["first_publish"])
    total, own, cumulative, threads, stages = summarise(folded)
    text = report(total, own, cumulative, threads, stages, eps, settings, rate, use_cli, native)
    waiting = sum(n for frame, n in own.items() if is_waiting(source_of(frame)))
    busy = max(total - waiting, 1)
    table = Table(title=f"nerve consumer, top {TOP} source lines by own time ({total:,} samples)")
    table.add_column("% all", justify="right")
    table.add_column("% busy", justify="right")
    table.add_column("function (file:line)")
    table.add_column("source")
    for frame, count in own.most_common(TOP):
        source = source_of(frame)
        share = "wait" if is_waiting(source) else f"{100 * count / busy:.1f}"
        table.add_row(
            f"{100 * count / max(total, 1):.1f}", share, _short(frame, line=True), escape(source)
        )
    console.print(table)
    table = Table(title=f"nerve consumer, top {TOP} functions by cumulative time")
    table.add_column("% all", justify="right")
    table.add_column("function (file)")
    for name, count in cumulative.most_common(TOP):
        table.add_row(f"{100 * count / max(total, 1):.1f}", name)
    console.print(table)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "embedded-profile.md").write_text(text)
    console.print(
        f"profiled run: {eps:,.0f} events/s under py-spy (slower than unprofiled); "
        f"wrote {(RESULTS_DIR / 'embedded-profile.md').relative_to(ROOT)}; "
        f"folded stacks in {folded.relative_to(ROOT)}"
    )
    return text


def report(
    total: int,
    own: Counter[str],
    cumulative: Counter[str],
    threads: Counter[str],
    stages: Counter[str],
    eps: float,
    settings: Settings,
    rate: int,
    use_cli: bool,
    native: bool,
) -> str:
    lines = [
        "# Embedded broker: profile of the nerve consumer",
        "",
        f"`py-spy record --rate {rate} --threads{' --native' if native else ''}` "
        "attached to the consumer "
        f"(`{'nerve run' if use_cli else 'benchmarks._consumer'}`) during the throughput "
        f"workload ({settings.events:,} events, batches of {settings.batch}, "
        f"synchronous={settings.synchronous}). {total:,} samples of non-idle threads. "
        f"Throughput while profiled: {eps:,.0f} events/s.",
        "",
        *stage_section("By stage", stages, None),
    ]
    return "\n".join(lines + sections(total, own, cumulative, threads))


def sections(
    total: int, own: Counter[str], cumulative: Counter[str], threads: Counter[str]
) -> list[str]:
    """The parts of a profile report every profile has: samples per thread, the top
    source lines by own time, the top functions by cumulative time."""
    lines = ["## Samples per thread", ""]
    for thread, count in threads.most_common():
        lines.append(f"- {thread}: {100 * count / max(total, 1):.1f}%")
    waiting = sum(n for frame, n in own.items() if is_waiting(source_of(frame)))
    busy = max(total - waiting, 1)
    lines += [
        "",
        f"## Top {TOP} source lines by own time (the line on top of the stack)",
        "",
        f"'% busy' leaves out the {100 * waiting / max(total, 1):.0f}% of samples where a "
        "thread was blocked on a queue, lock or event (py-spy does not always count "
        "those as idle); C work (SQLite, fsync, uvloop) is charged to the Python line "
        "that called it.",
        "",
        "| % all | % busy | function (file:line) | source |",
        "|---:|---:|---|---|",
    ]
    for frame, count in own.most_common(TOP):
        source = source_of(frame)
        share = "wait" if is_waiting(source) else f"{100 * count / busy:.1f}"
        lines.append(
            f"| {100 * count / max(total, 1):.1f} | {share} | `{_short(frame, line=True)}` "
            f"| `{source.replace('|', '/')}` |"
        )
    lines += [
        "",
        f"## Top {TOP} functions by cumulative time (anywhere on the stack)",
        "",
        "Entry points and the event loop's own frames are left out.",
        "",
        "| % all | function (file) |",
        "|---:|---|",
    ]
    for name, count in cumulative.most_common(TOP):
        lines.append(f"| {100 * count / max(total, 1):.1f} | `{name}` |")
    lines.append("")
    return lines


STAGES = (
    ("observability (nerve.observe)", ("nerve/observe/",)),
    ("event decoding (nerve.event, orjson)", ("nerve/event.py",)),
    ("data validation (pydantic, nerve.schema)", ("nerve/schema/", "pydantic/")),
    ("idempotency store (nerve.store)", ("nerve/store/",)),
    ("transport adapter (nerve.transport)", ("nerve/transport/", "nerve/_postgres.py")),
    (
        "broker client library",
        ("/redis/", "/asyncpg/", "/nats/", "/aio_pika/", "/aiormq/", "/aiokafka/", "/pamqp/"),
    ),
    ("SQLite worker threads (nerve._sqlite)", ("nerve/_sqlite.py",)),
    ("runner (nerve.runtime)", ("nerve/runtime/", "nerve/app.py")),
)
"""Where a sample's time goes: the innermost frame of the stack whose file matches
one of these; C work (orjson, pydantic-core, the client's parser) is charged to the
Python frame that called it, as py-spy does."""
OTHER = "the event loop (uvloop, asyncio) and everything else"
WAITING = "waiting (queue, lock, sleep)"


def stage_of(frames: list[str]) -> str:
    """The stage of one folded stack (outermost frame first)."""
    if is_waiting(source_of(frames[-1])):
        return WAITING
    for frame in reversed(frames):
        match = _LOCATION.match(frame.strip())
        path = "/" + (match.group("file") if match else frame)  # py-spy may shorten it
        for stage, markers in STAGES:
            if any(marker in path for marker in markers):
                return stage
    return OTHER


def stage_table(stages: Counter[str], cpu_us: float | None) -> list[str]:
    """Markdown rows: each stage's share of the busy samples and, given the consumer's
    CPU time per event, its cost per event in microseconds."""
    busy = sum(n for stage, n in stages.items() if stage != WAITING) or 1
    lines = ["| stage | % of busy samples |", "|---|---:|"]
    if cpu_us:
        lines = [lines[0] + " ≈ CPU µs/event |", lines[1] + "---:|"]
    for stage, count in stages.most_common():
        if stage == WAITING:
            continue
        row = f"| {stage} | {100 * count / busy:.1f} |"
        lines.append(row + f" {cpu_us * count / busy:,.1f} |" if cpu_us else row)
    return lines


def stage_section(title: str, stages: Counter[str], cpu_us: float | None) -> list[str]:
    """A report's section on stages: how samples are split, then :func:`stage_table`."""
    how = (
        "Each sample goes to the innermost frame of its stack that belongs to one of these "
        "stages (C work such as orjson, pydantic-core or the client's parser counts for "
        "the Python code that called it); samples blocked on a queue, lock or sleep are "
        "left out."
    )
    if cpu_us:
        how += " µs/event = the stage's share x the consumer's CPU time per event."
    return [f"## {title}", "", how, "", *stage_table(stages, cpu_us), ""]

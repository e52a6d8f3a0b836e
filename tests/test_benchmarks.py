"""The benchmark harness cannot rot: its quick mode runs end to end on the embedded
broker (real processes: ``nerve run`` consumer, producer, the sqlite3 floor), and the
goal arithmetic of ``benchmarks/compare.py`` is checked on hand-made series."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path
from shutil import which as shutil_which
from typing import Any

import orjson
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.compare import Case, Series, Settings, deadline_seconds, goals, plan  # noqa: E402


def _benchmarks(*args: str, timeout: float) -> subprocess.CompletedProcess[bytes]:
    """``python -m benchmarks ARGS`` from the repository, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "benchmarks", *args],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        timeout=timeout,
        check=False,
    )


def _quick_compare(out: Path, workload: str, *args: str, timeout: float) -> bytes:
    """``python -m benchmarks compare --quick`` of one workload on the embedded broker
    alone, writing to ``out``; its standard output."""
    command = ["compare", "--quick", "--workloads", workload, "--brokers", "sqlite"]
    done = _benchmarks(*command, "--peers", "none", *args, "--out", str(out), timeout=timeout)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    return done.stdout


@pytest.mark.slow
def test_quick_throughput_on_the_embedded_broker(tmp_path: Path) -> None:
    stdout = _quick_compare(tmp_path, "throughput", "--embedded-events", "400", timeout=110)
    summary = orjson.loads(stdout.strip().splitlines()[-1])
    assert set(summary) == {"throughput/sqlite/nerve", "throughput/sqlite/floor"}
    assert summary["throughput/sqlite/nerve"] > 0
    assert summary["throughput/sqlite/floor"] > 0

    doc = orjson.loads((tmp_path / "results" / "compare.json").read_bytes())
    for key in summary:
        series = doc["series"][key]
        assert series["failures"] == []
        assert len(series["runs"]) == 1
        run = series["runs"][0]
        assert run["events_per_s"] == pytest.approx(400 / run["seconds"])
    embedded_goal = next(g for g in doc["goals"] if g["text"].startswith("embedded: >= 15,000"))
    assert embedded_goal["met"] is (summary["throughput/sqlite/nerve"] >= 15_000)

    results = (tmp_path / "RESULTS.md").read_text()
    assert "## Throughput" in results
    assert "| sqlite | floor |" in results
    assert "Quick mode" in results
    chart = tmp_path / "results" / "compare-throughput.png"
    if importlib.util.find_spec("matplotlib") is None:  # the bench extra is not installed
        assert not chart.exists() and "## Charts" not in results
    else:
        assert chart.stat().st_size > 1000 and "results/compare-throughput.png" in results


@pytest.mark.slow
def test_quick_scale_on_the_embedded_broker_also_drains_a_backlog(tmp_path: Path) -> None:
    _quick_compare(tmp_path, "scale", "--scale-events", "600", timeout=170)
    doc = orjson.loads((tmp_path / "results" / "compare.json").read_bytes())
    for processes in (1, 2):
        series = doc["series"][f"scale/sqlite/nerve@{processes}"]
        assert series["failures"] == []
        (run,) = series["runs"]
        assert run["events_per_s"] == pytest.approx(600 / run["seconds"])
        assert run["drained_per_s"] > 0
    results = (tmp_path / "RESULTS.md").read_text()
    assert "| backlog drained/s | vs 1 process |" in results
    row = next(line for line in results.splitlines() if line.startswith("| sqlite | 2 |"))
    drained, vs_one = (cell.strip() for cell in row.strip("|").split("|")[-2:])
    assert drained.replace(",", "").isdigit() and vs_one.endswith("x")


def _series(workload: str, broker: str, system: str, values: list[float], param: float = 0.0,
            key: str = "events_per_s") -> Series:  # fmt: skip
    return Series(Case(workload, broker, system, param), runs=[{key: v} for v in values])


def test_goals_use_medians_and_say_what_was_not_measured() -> None:
    results = {
        s.case.key: s
        for s in (
            _series("throughput", "nats", "nerve", [5000, 6000, 9000]),
            _series("throughput", "nats", "raw", [10_000, 10_000, 1]),
            _series("throughput", "nats", "faststream", [4000, 4000, 4000]),
            _series("latency", "nats", "nerve", [1.0, 3.0, 5.0], 1000.0, "p99_ms"),
            _series("latency", "nats", "raw", [1.0, 1.0, 1.0], 1000.0, "p99_ms"),
        )
    }
    by_text = {g.text: g for g in goals(results, Settings())}
    raw = by_text["throughput nats: nerve >= 0.6x raw"]
    assert (raw.value, raw.met) == ("0.60x", True)  # 6000 / 10000: medians, not means
    faststream = by_text["throughput nats: nerve >= 1.5x FastStream"]
    assert (faststream.value, faststream.met) == ("1.50x", True)
    latency = by_text["latency nats: p99 at 1,000/s <= 2x raw"]
    assert latency.met is False  # 3.0 ms vs 1.0 ms
    assert by_text["throughput redis: nerve >= 0.6x raw"].met is None
    assert by_text["embedded: 2 processes >= 1.6x one"].value == "not measured"


def test_plan_alternates_systems_and_bounds_every_run() -> None:
    settings = Settings.quick_mode()
    groups = plan(settings)
    throughput_nats = next(g for g in groups if g[0].key == "throughput/nats/nerve")
    assert [c.system for c in throughput_nats] == [
        "nerve",
        "raw",
        "raw-typed",
        "faststream",
        "taskiq",
    ]
    assert all(g[0].system == "nerve" for g in groups)
    latency = [c for g in groups for c in g if c.workload == "latency"]
    assert {c.param for c in latency} == {500.0, 1000.0}
    assert not [c for c in latency if c.system in ("dramatiq", "celery", "taskiq")]
    full = Settings()
    for case in (c for g in plan(full) for c in g):
        assert 0 < deadline_seconds(case, full) <= 300


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["compare", "--workloads", "thruput"],
            "--workloads: unknown thruput; choose from throughput",
        ),
        (["compare", "--rates", "5x0"], "--rates: events per second, comma-separated"),
        (["compare", "--runs", "0"], "--runs must be positive"),
        (["compare", "--render", "no/such.json"], "--render: no/such.json is not a file"),
        (["redis-server", "--workloads", "warm"], "warm? use steady and/or bulk"),
        (["redis-server", "--events", "10"], "--events must be at least 100"),
    ],
)
def test_bad_options_say_what_is_wrong(args: list[str], message: str) -> None:
    done = _benchmarks(*args, timeout=60)
    assert done.returncode == 2
    assert message in done.stderr.decode()


@pytest.mark.parametrize("option", ["--cache", "--keep"])
def test_observe_refuses_callgrind_options_without_callgrind(option: str) -> None:
    done = _benchmarks("observe", option, timeout=60)
    assert done.returncode != 0
    assert "--cache and --keep go with --callgrind" in done.stderr.decode()


def test_observe_reports_paired_ratios_not_ratios_of_medians() -> None:
    """Five wall-clock rounds of a noisy run (this machine, 2026-11-23): the medians of
    each column gave 0.873x throughput and 1.121x CPU, "met"; the per-round ratios,
    which cancel the drift between rounds, give 0.833x and 1.193x: not met."""
    from rich.console import Console

    from benchmarks.observe import _report

    rates = {
        "off": [11865, 15280, 12509, 9822, 13001],
        "metrics": [11292, 13669, 11465, 12660, 13205],
        "metrics+otlp": [11024, 11759, 10423, 10916, 8857],
    }
    cpu = {
        "off": [75.0, 51.5, 70.0, 89.0, 67.0],
        "metrics": [77.0, 66.0, 78.5, 69.0, 65.5],
        "metrics+otlp": [77.0, 74.0, 83.5, 78.5, 97.0],
    }
    console = Console(record=True, width=200)
    summary, verdicts = _report(console, list(rates), rates, cpu, "test")
    assert verdicts[1].startswith("OTLP exporter: throughput 0.833x (-16.7%)")
    otlp = summary["metrics+otlp"]
    assert round(otlp["throughput_ratio"], 3) == 0.833
    assert round(otlp["cpu_ratio"], 3) == 1.193
    assert [round(x, 3) for x in otlp["throughput_ratio_range"]] == [0.681, 1.111]
    text = console.export_text()
    assert "OTLP exporter: throughput 0.833x (-16.7%)" in text
    assert "goal <= 15%: NOT met (rounds range throughput 0.68x-1.11x, CPU 0.88x-1.45x:" in text


def test_observe_saves_every_round_a_page_and_a_plot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wall-clock run leaves ``observe.json`` (the summary and each round's figures),
    ``observe.md`` (the table and verdicts) and ``observe.png`` (each round's ratios)."""
    from rich.console import Console

    from benchmarks import observe

    monkeypatch.setattr(observe, "RESULTS_DIR", tmp_path)
    rates = {"off": [100.0, 200.0], "metrics": [98.0, 190.0], "metrics+otlp": [90.0, 150.0]}
    cpu = {"off": [10.0, 5.0], "metrics": [10.2, 5.5], "metrics+otlp": [11.0, 7.0]}
    console = Console(record=True, width=200)
    summary, verdicts = observe._report(console, list(rates), rates, cpu, "a caption")
    observe._save(console, "observe", summary, verdicts, "a caption", {"rates": rates})
    observe._plot(tmp_path / "observe.png", list(rates), rates, cpu, "a caption")
    saved = orjson.loads((tmp_path / "observe.json").read_bytes())
    assert saved["rounds"] == {"rates": rates}
    assert saved["summary"]["metrics+otlp"]["throughput_ratio"] == pytest.approx(0.825)
    page = (tmp_path / "observe.md").read_text()
    assert "| metrics+otlp | 120 | 0.825x [0.75-0.90] | 9.0 | 1.250x [1.10-1.40] |" in page
    assert "- OTLP exporter: throughput 0.825x (-17.5%)" in page
    assert "](observe.png)" in page
    pytest.importorskip("matplotlib")
    assert (tmp_path / "observe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="needs Linux /proc/stat")
def test_cpu_sampler_counts_a_busy_core_over_the_window_asked() -> None:
    import time

    from benchmarks.embedded import CpuSampler

    with CpuSampler(every=0.01) as cpu:
        time.sleep(0.05)
        start = time.time()
        while time.time() - start < 0.4:  # this thread keeps one core busy
            pass
        end = time.time()
        time.sleep(0.05)
    busy = cpu.cores_busy(start, end)
    assert busy is not None
    assert 0.7 <= busy <= (os.cpu_count() or 1) + 0.05
    # a window the samples do not cover has no answer, rather than a made-up one
    assert cpu.cores_busy(start - 60, end) is None
    assert cpu.cores_busy(start, end + 60) is None


def test_per_event_table_gives_each_sides_consumer_and_producer_cpu() -> None:
    from benchmarks.report import _overhead

    nerve = Series(Case("throughput", "redis", "nerve"))
    nerve.runs = [
        {"events_per_s": 10_000, "consumer_cpu_us": 80.0, "producer_cpu_us": 20.0},
        {"events_per_s": 20_000, "consumer_cpu_us": 60.0, "producer_cpu_us": 30.0},
        {"events_per_s": 25_000, "consumer_cpu_us": 40.0, "producer_cpu_us": 25.0},
    ]
    for run, server in zip(nerve.runs, (90.0, 120.0, 100.0), strict=True):
        run["server_cpu_us"] = server
    raw = Series(Case("throughput", "redis", "raw"))
    raw.runs = [
        {
            "events_per_s": 50_000,
            "consumer_cpu_us": 15.0,
            "producer_cpu_us": 25.0,
            "server_cpu_us": 20.0,
        }
    ]
    kafka = Series(Case("throughput", "kafka", "nerve"), [{"events_per_s": 1000}])
    kafka_raw = Series(Case("throughput", "kafka", "raw"), [{"events_per_s": 2000}])
    lines = _overhead({s.case.key: s for s in (nerve, raw, kafka, kafka_raw)})
    # medians: 20,000/s = 50 µs, consumer 60 µs, producer 25 µs
    assert (
        "| redis | 50 | 20 | +30 | 60.0 / 15.0 = 4.0x | 25.0 / 25.0 = 1.0x "
        "| 100.0 / 20.0 = 5.0x |" in lines
    )
    assert "| kafka | 1,000 | 500 | +500 | - | - | - |" in lines  # not measured: said so


def test_profile_stages_go_to_the_innermost_frame_of_nerve_or_its_client(tmp_path: Path) -> None:
    from benchmarks import profiling

    loop = "run (uvloop/__init__.py:92)"
    attempt = "FunctionRunner._attempt (/x/nerve/runtime/runner.py:10)"
    read = "EventReader.read (/x/nerve/schema/upcast.py:5)"
    fetch = "RedisConsumer.fetch (/x/nerve/transport/redis.py:7)"
    client = "Redis.execute_command (redis/asyncio/client.py:600)"  # py-spy's short path
    stream = "StreamWriter.writelines (asyncio/streams.py:346)"
    worker = ROOT / "nerve" / "_sqlite.py"
    waits = 1 + worker.read_text().splitlines().index("            first = self._queue.get()")
    folded = tmp_path / "consumer.folded"
    folded.write_text(
        "\n".join(
            [
                f"thread (1): MainThread;{loop};{attempt};{read} 7",  # pydantic-core: the caller
                f"thread (1): MainThread;{loop};{fetch};{client};{stream} 3",
                f"thread (1): MainThread;{loop};{fetch} 2",
                f"thread (1): MainThread;{loop} 5",
                f"thread (2): nerve-store;Worker._serve ({worker}:{waits}) 11",  # queue.get()
                "",
            ]
        )
    )
    total, _, _, threads, stages = profiling.summarise(folded)
    assert (total, threads["MainThread"], threads["nerve-store"]) == (28, 17, 11)
    assert stages == {
        "data validation (pydantic, nerve.schema)": 7,
        "broker client library": 3,
        "transport adapter (nerve.transport)": 2,
        profiling.OTHER: 5,
        profiling.WAITING: 11,
    }
    rows = profiling.stage_table(stages, cpu_us=34.0)
    assert rows[2] == "| data validation (pydantic, nerve.schema) | 41.2 | 14.0 |"  # 7 of 17 busy
    assert not any(profiling.WAITING in row for row in rows)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_cpu_seconds_of_a_process_counts_its_busy_time() -> None:
    import time

    from benchmarks.embedded import cpu_seconds

    before = cpu_seconds(os.getpid())
    start = time.monotonic()
    while time.monotonic() - start < 0.3:
        pass
    after = cpu_seconds(os.getpid())
    assert before is not None and after is not None
    assert 0.2 <= after - before <= 0.5
    assert cpu_seconds(2**22 + 12345) is None  # no such process: no made-up figure


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_cpu_by_name_counts_every_process_of_a_server_started_or_not() -> None:
    import subprocess
    import sys

    from benchmarks.embedded import cpu_by_name, cpu_since

    name = "py"  # "pytest" (the script's name) or "python": this process and its child
    before = cpu_by_name((name,))
    assert os.getpid() in before
    spin = "import time\nend = time.monotonic() + 0.3\nwhile time.monotonic() < end: pass"
    child = subprocess.Popen([sys.executable, "-c", spin + "\ntime.sleep(5)"])
    try:
        time.sleep(1.0)  # the child has spun and now sleeps
        after = cpu_by_name((name,))
        assert child.pid in after and child.pid not in before
        assert after[child.pid].seconds >= 0.2  # started meanwhile: counted from zero
        assert after[child.pid].parent == os.getpid()
        assert cpu_since(before, after) >= after[child.pid].seconds
        assert cpu_by_name(("no-such-server-x",)) == {}
    finally:
        child.kill()
        child.wait()


def test_cpu_since_counts_a_process_that_ended_when_a_named_parent_reaped_it() -> None:
    """A PostgreSQL backend whose connection closed within the window (a producer done
    publishing) is gone from the second reading; its time is in the postmaster's, which
    reaped it. Here a parent process (named ``nrvcpu-parent``) runs a child
    (``nrvcpu-child``) that spins before the window and in it, then ends and is reaped:
    the window's CPU time holds the child's spin in the window, not the one before."""
    import subprocess
    import sys

    from benchmarks.embedded import ProcessCpu, cpu_by_name, cpu_since

    name = "import ctypes\nctypes.CDLL(None).prctl(15, b'nrvcpu-{}', 0, 0, 0)\n"
    spin = "end = time.monotonic() + {}\nwhile time.monotonic() < end: pass\n"
    child = name.format("child") + "import sys, time\n" + spin.format(0.3)
    child += "sys.stdin.readline()\n" + spin.format(0.4)
    parent = name.format("parent") + "import subprocess, sys\n"
    parent += f"c = subprocess.Popen([sys.executable, '-c', {child!r}], stdin=subprocess.PIPE)\n"
    parent += "sys.stdin.readline()\nc.communicate(b'go\\n')\nprint('reaped', flush=True)\n"
    parent += "sys.stdin.readline()\n"
    with subprocess.Popen(
        [sys.executable, "-c", parent], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    ) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        try:
            time.sleep(1.5)  # the child has spun its 0.3 s and waits
            before = cpu_by_name(("nrvcpu",))
            (kid,) = [pid for pid, cpu in before.items() if cpu.parent == proc.pid]
            assert proc.pid in before and before[kid].seconds >= 0.1
            proc.stdin.write(b"go\n")
            proc.stdin.flush()
            assert proc.stdout.readline() == b"reaped\n"  # the child spun 0.4 s, ended
            after = cpu_by_name(("nrvcpu",))
        finally:
            proc.kill()
    assert kid not in after and proc.pid in after
    spent = cpu_since(before, after)
    # the parent's time grew by the child's whole time; the part before the window
    # is taken off, once
    grown = after[proc.pid].seconds - before[proc.pid].seconds
    assert spent == pytest.approx(grown - before[kid].seconds)
    assert 0.05 < spent < grown
    # a process gone without a parent in the reading is not seen: nothing taken off
    assert cpu_since(before | {1: ProcessCpu(5.0, 0)}, after) == pytest.approx(spent)


@pytest.mark.slow
def test_observe_drain_times_a_consumer_draining_published_events(tmp_path: Path) -> None:
    """``observe --drain``: events published first (traced, as the configuration
    says), then a consumer drains them; its rate and CPU from first to last event."""
    from benchmarks.observe import configurations, drain_run, start_sink

    endpoint, stop = start_sink()
    try:
        seen: list[int] = []
        result = drain_run(
            tmp_path, 300, configurations(endpoint, False)["metrics+otlp"], seen.append
        )
    finally:
        stop()
    assert seen == [0, 300]
    assert result["events_per_s"] > 0 and result["consumer_cpu_us"] > 0
    times = orjson.loads((tmp_path / "times.json").read_bytes())
    assert times["events"] == 299 and times["dropped_spans"] == result["dropped_spans"] == 0


def _benchmark_summary(*args: str) -> Any:
    """Run ``python -m benchmarks ARGS`` (a callgrind count); its last line, the JSON
    summary, parsed."""
    done = _benchmarks(*args, timeout=600)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    return orjson.loads(done.stdout.decode().strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(
    not all(map(shutil_which, ("valgrind", "redis-server", "redis-cli"))),
    reason="needs valgrind and redis-server (a tool, not a server nerve talks to)",
)
def test_redis_server_instructions_per_event_are_counted() -> None:
    """A real count: a redis-server under callgrind, the adapter's publish, claim and
    ack of 100 and 400 events; the difference per event is in the range a Lua-scripted
    queue costs (tens of thousands of instructions, not zero, not millions)."""
    summary = _benchmark_summary("redis-server", "--events", "100", "--workloads", "steady")
    assert set(summary) == {"steady"}
    assert 20_000 < summary["steady"] < 1_000_000, summary


@pytest.mark.slow
@pytest.mark.skipif(
    not all(map(shutil_which, ("valgrind", "cc"))),
    reason="needs valgrind and a C compiler (tools, not servers nerve talks to)",
)
def test_consumer_instructions_per_event_are_counted_per_broker() -> None:
    """``brokers --callgrind``: a real nerve consumer drains events published to a real
    Redis under callgrind; its instructions per event are in the range a Python
    consumer costs (not zero, not millions), the event loop's thread counted apart,
    and what the round created on the server is deleted afterwards."""
    import redis

    summary = _benchmark_summary(
        "brokers", "--callgrind", "--brokers", "redis", "--runs", "1", "--events", "200"
    )
    assert set(summary) == {"redis"}
    counted = summary["redis"]
    assert 20_000 < counted["event_loop_thread"] <= counted["instructions_per_event"], counted
    assert counted["instructions_per_event"] < 2_000_000, counted
    split = counted["instructions_per_event"] - counted["event_loop_thread"]
    assert abs(counted["other_threads"] - split) <= 1, counted  # (each a rounded median)
    client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    try:
        assert not list(client.scan_iter(match="cg_*", count=1000))
    finally:
        client.close()


def test_postgres_sides_without_the_runtime_run_nerves_statements(tmp_path: Path) -> None:
    """``brokers --sides ...,sql,sql-norec`` on a real PostgreSQL: the sides that run
    nerve's own statements without its runtime drain every event (the harness waits for
    the N-th), the report gives their ratios to raw, and each run's schemas are dropped."""
    import asyncpg  # type: ignore[import-untyped]

    done = _benchmarks(
        "brokers", "--brokers", "postgres", "--sides", "nerve,raw,sql,sql-norec",
        "--runs", "1", "--events", "300", "--out", str(tmp_path), timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    summary = orjson.loads(done.stdout.decode().strip().splitlines()[-1])["postgres"]
    for side in ("nerve", "raw", "sql", "sql_norec"):
        assert summary[side] > 0, summary
    assert summary["sql_ratio"] == pytest.approx(summary["sql"] / summary["raw"], abs=0.001)
    page = (tmp_path / "brokers.md").read_text()
    assert "| postgres |" in page and "sql-norec/raw" in page
    assert "BATCH" not in page  # the batch size is filled in
    assert (tmp_path / "brokers.json").exists()
    if importlib.util.find_spec("matplotlib") is not None:  # the bench extra's
        assert (tmp_path / "brokers.png").stat().st_size > 10_000

    async def leftovers() -> list[str]:
        conn = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/test")
        try:
            rows = await conn.fetch(
                "SELECT nspname FROM pg_namespace WHERE nspname ~ '^(nb|rb|sq|sn)_[0-9]+_1'"
            )
        finally:
            await conn.close()
        return [r[0] for r in rows]

    assert asyncio.run(leftovers()) == []


def test_brokers_page_sets_each_sides_cpu_per_event_beside_its_ratio() -> None:
    """The page's CPU table: per side, the medians of consumer, producer and server CPU
    per event and their sum; raw's total over the side's next to the measured ratio; a
    side whose runs did not all measure CPU is left out, and the summary line carries
    nerve's and raw's totals."""
    from benchmarks.brokers import cpu_section, summary_line

    def run(rate: float, consumer: float, producer: float, server: float) -> dict[str, float]:
        return {
            "events_per_s": rate,
            "consumer_cpu_us": consumer,
            "producer_cpu_us": producer,
            "server_cpu_us": server,
        }

    results = {
        "postgres": {
            "nerve": [run(30_000, 15, 6, 14), run(40_000, 14, 5, 16), run(35_000, 16, 7, 15)],
            "raw": [run(100_000, 3, 1.5, 3.5), run(90_000, 3, 1.5, 4.5)],
            "sql": [run(40_000, 6, 1.5, 15), {"events_per_s": 41_000}],
        }
    }
    lines = cpu_section(results)
    # nerve: medians 15 + 6 + 15 = 36; raw: 3 + 1.5 + 4 = 8.5; 8.5 / 36 = 0.24
    assert "| postgres | nerve | 15.0 | 6.0 | 15.0 | 36.0 | 0.24x | 0.37x |" in lines
    assert "| postgres | raw | 3.0 | 1.5 | 4.0 | 8.5 | - | - |" in lines
    assert not [line for line in lines if "| sql |" in line]  # one run not measured
    summary = summary_line(results)["postgres"]
    assert summary["nerve_cpu_us"] == 36.0 and summary["raw_cpu_us"] == 8.5
    assert summary["cpu_ratio"] == pytest.approx(8.5 / 36, abs=0.001)
    assert cpu_section({"kafka": {"nerve": [{"events_per_s": 1.0}], "raw": []}}) == []
    zero = {"nerve": [run(1.0, 0, 0, 0)], "raw": [run(2.0, 1, 1, 1)]}
    lines = cpu_section({"redis": zero})  # nerve's run too short to count: left out
    assert "| redis | raw | 1.0 | 1.0 | 1.0 | 3.0 | - | - |" in lines
    assert not [line for line in lines if "| nerve |" in line]
    assert "cpu_ratio" not in summary_line({"redis": zero})["redis"]

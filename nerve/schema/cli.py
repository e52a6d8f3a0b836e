"""``nerve schema``, ``nerve asyncapi`` and ``nerve graph``: event contracts at the CLI.

::

    nerve schema list                       subjects, versions and modes in the registry
    nerve schema show TYPE [--version N]    one schema (JSON)
    nerve schema diff TYPE A B              what changed between two versions, and
                                            whether each direction still reads
    nerve schema export DIR [--app M:APP]   write the schemas to DIR/<type>/<version>.json
    nerve schema check M:APP [--against DIR|registry]
                                            exit 1 if the App breaks its baseline
    nerve schema mode TYPE [MODE]           show or set a subject's compatibility mode
    nerve asyncapi M:APP [--broker URL]     the AsyncAPI 3.0 document
    nerve graph M:APP [--format mermaid|dot|json]

The registry is the one beside the broker's store (``schema.db``), or ``--registry``
(``NERVE_REGISTRY``). ``list``, ``show``, ``diff`` and ``export`` read an App instead
with ``--app MODULE:APP``. Errors are one line on stderr with exit code 2, as
everywhere in the CLI; ``check`` exits 1 on a breaking change, so CI can gate on it.
"""

from __future__ import annotations

import asyncio
import difflib
import sys
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar
from urllib.parse import urlsplit

import orjson
import typer
from rich.table import Table
from rich.text import Text

from nerve.schema.compat import Compatibility, Finding, check_compatibility, render_findings
from nerve.schema.registry import (
    SchemaRegistry,
    default_registry_url,
    registry_from_url,
)
from nerve.transport import DEFAULT_BROKER

if TYPE_CHECKING:
    from nerve.app import App

__all__ = ["asyncapi_command", "graph_command", "schema_cli"]

T = TypeVar("T")
EXIT_BREAKING = 1
INDEX_FILE = "schemas.json"

schema_cli = typer.Typer(
    help="Event schemas: list, show, diff, export, check an App against a baseline.",
    no_args_is_help=True,
    add_completion=False,
)

RegistryOption = Annotated[
    str | None,
    typer.Option(
        "--registry",
        envvar="NERVE_REGISTRY",
        metavar="URL",
        help="Schema registry URL (default: schema.db beside the store).",
        show_default=False,
    ),
]
BrokerOption = Annotated[
    str,
    typer.Option("--broker", "-b", envvar="NERVE_BROKER", metavar="URL", help="Broker URL."),
]
StoreOption = Annotated[
    str | None,
    typer.Option("--store", envvar="NERVE_STORE", metavar="URL", show_default=False),
]
AppOption = Annotated[
    str | None,
    typer.Option(
        "--app",
        metavar="MODULE:APP",
        help="Read the schemas an App declares instead of the registry.",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")]


@contextmanager
def _edge() -> Iterator[None]:
    from nerve.cli import _edge as cli_edge

    with cli_edge():
        yield


def _fail(message: str) -> Exception:
    from nerve.cli import CliError

    return CliError(message)


def _load(target: str) -> App:
    from nerve.cli import load_app

    return load_app(target)


def _print_json(doc: Any) -> None:
    sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
    sys.stdout.flush()


def _pretty(schema: Any) -> str:
    return orjson.dumps(schema, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode()


def _run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def _registry_url(registry: str | None, broker: str, store: str | None) -> str:
    if registry:
        return registry
    from nerve.store import default_store_url

    return default_registry_url(store or default_store_url(broker), broker)


def _open_registry(url: str) -> SchemaRegistry:
    """A registry to read: a missing SQLite file is an error, not an empty registry."""
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        if not Path(path).exists():
            raise _fail(
                f"no schema registry at {path!r}: nothing has registered schemas yet; start "
                "the App with 'nerve run MODULE:APP', read an App with --app MODULE:APP, or "
                "pass --registry (or NERVE_REGISTRY)"
            )
    try:
        return registry_from_url(url)
    except Exception as exc:
        raise _fail(str(exc)) from None


async def _app_registry(app: App) -> SchemaRegistry:
    """An in-memory registry holding what ``app`` declares (mode NONE: no checks)."""
    registry = registry_from_url("memory://", default_mode=Compatibility.NONE)
    await registry.storage.start()
    for name in sorted(app.versions):
        for version, declared in sorted(app.versions[name].items()):
            await registry.register(name, version, declared.json_schema())
    return registry


async def _source(app: str | None, url: str) -> SchemaRegistry:
    if app is not None:
        return await _app_registry(_load(app))
    registry = _open_registry(url)
    await registry.storage.start()
    return registry


# ---------------------------------------------------------------------------------------


@schema_cli.command("list")
def list_schemas(
    app: AppOption = None,
    registry: RegistryOption = None,
    broker: BrokerOption = DEFAULT_BROKER,
    store: StoreOption = None,
    as_json: JsonOption = False,
) -> None:
    """List event types with their versions and compatibility modes."""
    with _edge():
        rows = _run(_list(app, _registry_url(registry, broker, store)))
    if as_json:
        _print_json(rows)
        return
    table = Table("type", "versions", "mode", "latest", box=None, pad_edge=False)
    for row in rows:
        forced = " (forced)" if row["forced"] else ""
        table.add_row(
            row["type"],
            ", ".join(map(str, row["versions"])),
            row["mode"],
            f"v{row['latest']} rev {row['revision']}{forced}",
        )
    from rich.console import Console

    Console(highlight=False).print(table)


async def _list(app: str | None, url: str) -> list[dict[str, Any]]:
    registry = await _source(app, url)
    try:
        rows = []
        for subject in await registry.subjects():
            versions = await registry.versions(subject)
            latest = versions[-1]
            rows.append(
                {
                    "type": subject,
                    "versions": [v.version for v in versions],
                    "mode": "-" if app else (await registry.mode(subject)).value,
                    "latest": latest.version,
                    "revision": latest.revision,
                    "forced": latest.forced,
                }
            )
        return rows
    finally:
        await registry.storage.close()


@schema_cli.command("show")
def show(
    type_name: Annotated[str, typer.Argument(metavar="TYPE", help="The event type.")],
    version: Annotated[
        int | None, typer.Option("--version", "-v", min=1, help="Default: the latest.")
    ] = None,
    app: AppOption = None,
    registry: RegistryOption = None,
    broker: BrokerOption = DEFAULT_BROKER,
    store: StoreOption = None,
) -> None:
    """Print the JSON Schema of one version of an event type."""
    with _edge():
        schema = _run(_show(app, _registry_url(registry, broker, store), type_name, version))
    _print_json(schema)


async def _show(app: str | None, url: str, type_name: str, version: int | None) -> Any:
    registry = await _source(app, url)
    try:
        return (await _entry(registry, type_name, version)).schema
    finally:
        await registry.storage.close()


async def _entry(registry: SchemaRegistry, type_name: str, version: int | None) -> Any:
    found = await registry.lookup(type_name, version)
    if found is not None:
        return found
    known = [v.version for v in await registry.versions(type_name)]
    if not known:
        subjects = await registry.subjects()
        close = difflib.get_close_matches(type_name, subjects, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise _fail(f"no schema for event type {type_name!r}{hint}")
    raise _fail(f"{type_name!r} has no version {version}; versions: {', '.join(map(str, known))}")


@schema_cli.command("diff")
def diff(
    type_name: Annotated[str, typer.Argument(metavar="TYPE")],
    old: Annotated[int, typer.Argument(metavar="A", min=1, help="The older version.")],
    new: Annotated[int, typer.Argument(metavar="B", min=1, help="The newer version.")],
    app: AppOption = None,
    registry: RegistryOption = None,
    broker: BrokerOption = DEFAULT_BROKER,
    store: StoreOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show what changed between versions A and B, and which direction still reads."""
    with _edge():
        a, b = _run(_pair(app, _registry_url(registry, broker, store), type_name, old, new))
    backward = check_compatibility(b, [(old, a)], Compatibility.BACKWARD)
    forward = check_compatibility(b, [(old, a)], Compatibility.FORWARD)
    if as_json:
        _print_json(
            {
                "type": type_name,
                "old": old,
                "new": new,
                "backward": [f.to_json() for f in backward],
                "forward": [f.to_json() for f in forward],
            }
        )
        return
    lines = difflib.unified_diff(
        _pretty(a).splitlines(),
        _pretty(b).splitlines(),
        f"{type_name} v{old}",
        f"{type_name} v{new}",
        lineterm="",
    )
    out = sys.stdout
    out.write("\n".join(lines) + "\n")
    for label, findings, meaning in (
        ("BACKWARD", backward, f"v{new} reads data written as v{old}"),
        ("FORWARD", forward, f"v{old} reads data written as v{new}"),
    ):
        verdict = "holds" if not findings else "BROKEN"
        out.write(f"\n{label} ({meaning}): {verdict}\n")
        if findings:
            out.write(_indent(render_findings(findings)) + "\n")


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


async def _pair(app: str | None, url: str, type_name: str, old: int, new: int) -> tuple[Any, Any]:
    registry = await _source(app, url)
    try:
        a = await _entry(registry, type_name, old)
        b = await _entry(registry, type_name, new)
        return a.schema, b.schema
    finally:
        await registry.storage.close()


@schema_cli.command("export")
def export(
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="Where to write them.")],
    app: AppOption = None,
    registry: RegistryOption = None,
    broker: BrokerOption = DEFAULT_BROKER,
    store: StoreOption = None,
) -> None:
    """Write every schema to DIR/<type>/<version>.json (and DIR/schemas.json, the
    index with each type's versions and mode), for a team to commit."""
    with _edge():
        index = _run(_export(app, _registry_url(registry, broker, store), directory))
    count = sum(len(v["versions"]) for v in index.values())
    from nerve.cli import _note

    _note(f"wrote {count} schema(s) of {len(index)} event type(s) to {directory}", style="dim")


async def _export(app: str | None, url: str, directory: Path) -> dict[str, Any]:
    registry = await _source(app, url)
    index: dict[str, Any] = {}
    try:
        for subject in await registry.subjects():
            versions = await registry.versions(subject)
            folder = directory / subject
            folder.mkdir(parents=True, exist_ok=True)
            for entry in versions:
                (folder / f"{entry.version}.json").write_text(_pretty(entry.schema) + "\n")
            mode = Compatibility.BACKWARD if app else await registry.mode(subject)
            index[subject] = {
                "compatibility": mode.value,
                "versions": [v.version for v in versions],
            }
    except OSError as exc:
        raise _fail(f"cannot write to {directory}: {exc}") from None
    finally:
        await registry.storage.close()
    (directory / INDEX_FILE).write_text(_pretty(index) + "\n")
    return index


@schema_cli.command("check")
def check(
    target: Annotated[str, typer.Argument(metavar="MODULE:APP", help="The App to check.")],
    against: Annotated[
        str,
        typer.Option(
            "--against",
            metavar="DIR|registry",
            help="The baseline: a folder written by 'nerve schema export', or the registry.",
        ),
    ] = "registry",
    mode: Annotated[
        str | None,
        typer.Option(
            "--mode",
            help="Compatibility mode for types the baseline gives none (default BACKWARD).",
            show_default=False,
        ),
    ] = None,
    registry: RegistryOption = None,
    broker: BrokerOption = DEFAULT_BROKER,
    store: StoreOption = None,
    as_json: JsonOption = False,
) -> None:
    """Check an App's schemas against a baseline; exit 1 on a breaking change."""
    with _edge():
        app = _load(target)
        try:
            default_mode = Compatibility.parse(mode) if mode else Compatibility.BACKWARD
        except ValueError as exc:
            raise _fail(f"--mode: {exc}") from None
        url = _registry_url(registry, broker, store)
        folder = None if against == "registry" else _read_folder(Path(against))
        results = _run(_check(app, folder, url, default_mode))
    broken = [r for r in results if r["findings"]]
    if as_json:
        _print_json([{**r, "findings": [f.to_json() for f in r["findings"]]} for r in results])
    else:
        from rich.console import Console

        console = Console(highlight=False)
        for r in results:
            status = Text("BREAKING", style="bold red") if r["findings"] else Text("ok", "green")
            console.print(
                Text.assemble(status, f"  {r['type']} v{r['version']}  ({r['status']})"),
                soft_wrap=True,
            )
            if r["findings"]:
                console.print(Text(_indent(render_findings(r["findings"]))), soft_wrap=True)
        summary = (
            f"{len(broken)} breaking change(s) against {against}"
            if broken
            else f"no breaking change against {against}"
        )
        console.print(Text(summary, style="bold red" if broken else "bold"))
    if broken:
        raise typer.Exit(EXIT_BREAKING)


async def _check(
    app: App,
    folder: tuple[dict[str, Any], list[tuple[str, list[tuple[int, Any]]]]] | None,
    url: str,
    default_mode: Compatibility,
) -> list[dict[str, Any]]:
    if folder is None:
        baseline = _open_registry(url)
        baseline.default_mode = default_mode
        await baseline.storage.start()
    else:
        baseline = await _folder_registry(folder, default_mode)
    results: list[dict[str, Any]] = []
    try:
        for name in sorted(app.versions):
            for version, declared in sorted(app.versions[name].items()):
                covered = {
                    k
                    for k in range(1, version)
                    if (chain := app.upcasters.chain(name, k, version)) and chain[-1][1] == version
                }
                schema = declared.json_schema()
                current = await baseline.lookup(name, version)
                if current is None:
                    status = "new"
                elif current.schema == schema:
                    status = "unchanged"
                else:
                    status = "changed"
                findings: list[Finding] = []
                if status != "unchanged":
                    findings = await baseline.check(name, version, schema, upcast_from=covered)
                results.append(
                    {"type": name, "version": version, "status": status, "findings": findings}
                )
    finally:
        await baseline.storage.close()
    return results


def _read_folder(
    directory: Path,
) -> tuple[dict[str, Any], list[tuple[str, list[tuple[int, Any]]]]]:
    """A baseline folder (``nerve schema export``): its index and, per type, its
    ``(version, schema)`` files."""
    if not directory.is_dir():
        raise _fail(
            f"--against {str(directory)!r}: no such folder; write one with 'nerve schema "
            "export DIR', or use --against registry"
        )
    index: dict[str, Any] = {}
    try:
        if (directory / INDEX_FILE).exists():
            index = orjson.loads((directory / INDEX_FILE).read_bytes())
        subjects: list[tuple[str, list[tuple[int, Any]]]] = []
        for folder in sorted(p for p in directory.iterdir() if p.is_dir()):
            versions = []
            for path in sorted(folder.glob("*.json")):
                if path.stem.isdigit() and int(path.stem) > 0:
                    versions.append((int(path.stem), orjson.loads(path.read_bytes())))
            if versions:
                subjects.append((folder.name, sorted(versions, key=lambda v: v[0])))
    except orjson.JSONDecodeError as exc:
        raise _fail(f"a file in {directory} is not valid JSON: {exc}") from None
    return index, subjects


async def _folder_registry(
    folder: tuple[dict[str, Any], list[tuple[str, list[tuple[int, Any]]]]],
    default_mode: Compatibility,
) -> SchemaRegistry:
    """A baseline folder as an in-memory registry, with the modes of its index."""
    index, subjects = folder
    registry = registry_from_url("memory://", default_mode=default_mode)
    await registry.storage.start()
    for subject, versions in subjects:
        for version, schema in versions:
            await registry.register(subject, version, schema, allow_incompatible=True)
        declared_mode = index.get(subject, {}).get("compatibility")
        if declared_mode:
            try:
                await registry.set_mode(subject, declared_mode)
            except ValueError as exc:
                raise _fail(f"{INDEX_FILE}: {subject}: {exc}") from None
    return registry


@schema_cli.command("mode")
def mode_command(
    type_name: Annotated[str, typer.Argument(metavar="TYPE")],
    new_mode: Annotated[
        str | None,
        typer.Argument(
            metavar="[MODE]",
            help="BACKWARD, FORWARD, FULL (+_TRANSITIVE) or NONE.",
            show_default=False,
        ),
    ] = None,
    registry: RegistryOption = None,
    broker: BrokerOption = DEFAULT_BROKER,
    store: StoreOption = None,
) -> None:
    """Show or set the compatibility mode of an event type in the registry."""
    with _edge():
        parsed = None
        if new_mode is not None:
            try:
                parsed = Compatibility.parse(new_mode)
            except ValueError as exc:
                raise _fail(str(exc)) from None
        url = _registry_url(registry, broker, store)
        current = _run(_mode(url, type_name, parsed))
    typer.echo(current.value)


async def _mode(url: str, type_name: str, new: Compatibility | None) -> Compatibility:
    registry = registry_from_url(url) if new is not None else _open_registry(url)
    async with registry:
        if new is not None:
            await registry.set_mode(type_name, new)
        return await registry.mode(type_name)


# ---------------------------------------------------------------------------------------


def asyncapi_command(
    target: Annotated[str, typer.Argument(metavar="MODULE:APP", help="The App to document.")],
    broker: Annotated[
        str | None,
        typer.Option(
            "--broker",
            "-b",
            envvar="NERVE_BROKER",
            metavar="URL",
            help="Broker URL: the document's server (credentials are left out).",
            show_default=False,
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", metavar="FILE", help="Write here instead of stdout."),
    ] = None,
    doc_version: Annotated[
        str, typer.Option("--doc-version", help="The document's info.version.")
    ] = "1.0.0",
) -> None:
    """Write the AsyncAPI 3.0 document of an App (JSON)."""
    from nerve.schema.asyncapi import build_asyncapi

    with _edge():
        app = _load(target)
        doc = build_asyncapi(app, broker=broker, version=doc_version)
        text = orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n"
        if output is None:
            sys.stdout.write(text)
            return
        try:
            output.write_text(text)
        except OSError as exc:
            raise _fail(f"cannot write {output}: {exc}") from None


class GraphFormat(StrEnum):
    mermaid = "mermaid"
    dot = "dot"
    json = "json"


def graph_command(
    target: Annotated[str, typer.Argument(metavar="MODULE:APP", help="The App to draw.")],
    fmt: Annotated[
        GraphFormat, typer.Option("--format", "-f", help="mermaid, dot (Graphviz) or json.")
    ] = GraphFormat.mermaid,
) -> None:
    """Print the App's topology: producers, event types and functions."""
    from nerve.schema.graph import build_graph, to_dot, to_mermaid

    with _edge():
        graph = build_graph(_load(target))
    if fmt is GraphFormat.json:
        _print_json(graph.to_json())
    else:
        sys.stdout.write(to_mermaid(graph) if fmt is GraphFormat.mermaid else to_dot(graph))

"""``nerve keys create|list|revoke``: the HTTP edge's API keys (see nerve.http.auth).

The secret is printed once, on stdout, by ``create``, and never stored or logged.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import orjson
import typer
from rich.console import Console
from rich.table import Table

from nerve.errors import ConfigError
from nerve.http.auth import KeyStore
from nerve.http.running import key_store_path
from nerve.store import default_store_url
from nerve.transport import DEFAULT_BROKER

__all__ = ["keys_cli"]

keys_cli = typer.Typer(
    help="API keys of the HTTP edge: create, list, revoke.",
    no_args_is_help=True,
    add_completion=False,
)

BrokerOpt = Annotated[
    str, typer.Option("--broker", "-b", envvar="NERVE_BROKER", metavar="URL", help="Broker URL.")
]
StoreOpt = Annotated[
    str | None,
    typer.Option(
        "--store", envvar="NERVE_STORE", metavar="URL", help="Store URL (keys live in it)."
    ),
]


def _open(broker: str, store: str | None) -> KeyStore:
    url = store or default_store_url(broker)
    path = key_store_path(url)
    if path == ":memory:":
        raise ConfigError(
            f"store {url} lives in memory: keys there would vanish; use a sqlite:// store"
        )
    return KeyStore(path)


def _fail(message: str) -> typer.Exit:
    Console(stderr=True, highlight=False).print(f"[bold red]error:[/] {message}", soft_wrap=True)
    return typer.Exit(2)


@keys_cli.command("create")
def create(
    name: Annotated[str, typer.Argument(help="Who or what uses the key.")],
    scope: Annotated[
        list[str],
        typer.Option(
            "--scope",
            "-s",
            help="Event types it may publish ('order.*', 'order.>', '>') or 'admin'; repeat.",
        ),
    ],
    broker: BrokerOpt = DEFAULT_BROKER,
    store: StoreOpt = None,
) -> None:
    """Create a key; prints the key once (store it now: it cannot be shown again)."""
    try:
        keys = _open(broker, store)
        try:
            key, secret = keys.create(name, scope)
        finally:
            keys.close()
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    Console(stderr=True, highlight=False).print(
        f"created key {key.id} ({key.name}), scopes: {', '.join(key.scopes)}; the key is "
        "printed below ONCE, send it as 'Authorization: Bearer <key>'",
        soft_wrap=True,
    )
    typer.echo(secret)


@keys_cli.command("list")
def list_keys(
    broker: BrokerOpt = DEFAULT_BROKER,
    store: StoreOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable JSON.")] = False,
) -> None:
    """List keys (ids, names, scopes; never secrets)."""
    try:
        keys = _open(broker, store)
        try:
            found = keys.list()
        finally:
            keys.close()
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    if as_json:
        typer.echo(
            orjson.dumps(
                [
                    {
                        "id": k.id,
                        "name": k.name,
                        "scopes": list(k.scopes),
                        "created_at": k.created_at,
                        "revoked_at": k.revoked_at,
                    }
                    for k in found
                ],
                option=orjson.OPT_INDENT_2,
            ).decode()
        )
        return
    table = Table("id", "name", "scopes", "created", "state")
    for k in found:
        created = datetime.fromtimestamp(k.created_at).strftime("%Y-%m-%d %H:%M")
        table.add_row(
            k.id, k.name, " ".join(k.scopes), created, "revoked" if k.revoked_at else "active"
        )
    Console(highlight=False).print(table)


@keys_cli.command("revoke")
def revoke(
    key_id: Annotated[str, typer.Argument(metavar="ID", help="The key's id (or the key).")],
    broker: BrokerOpt = DEFAULT_BROKER,
    store: StoreOpt = None,
) -> None:
    """Revoke a key: every server refuses it within 0.1 s."""
    try:
        keys = _open(broker, store)
        try:
            done = keys.revoke(key_id)
        finally:
            keys.close()
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    if not done:
        raise _fail(f"no active key {key_id!r}; see 'nerve keys list'")
    typer.echo(f"revoked {key_id if len(key_id) == 12 else 'the key'}")

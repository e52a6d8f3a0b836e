"""The topology of an App: who produces which event type, who consumes it, who emits what.

:func:`build_graph` turns an App into plain data (:class:`Graph` of :class:`Node` and
:class:`Edge`, JSON-ready with :meth:`Graph.to_json`) that the CLI draws and the
dashboard reads. Three kinds of node:

- ``producer``: where events enter the system from outside. An event type that no
  function emits is published by clients (``Client.publish``, the HTTP edge, the
  CLI): one producer node stands for them.
- ``event``: an event type (all its declared versions).
- ``function``: a declared function.

Edges: ``produces`` (producer -> event), ``consumes`` (event -> function; a pattern
subscription is drawn to every declared type it matches) and ``emits`` (function ->
event). :func:`to_mermaid` draws it as a Mermaid flowchart, in the style of the
classic producer -> broker -> consumer diagram; :func:`to_dot` as Graphviz DOT.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from nerve.app import App

__all__ = ["Edge", "Graph", "Node", "build_graph", "to_dot", "to_mermaid"]

NodeKind = Literal["producer", "event", "function"]
EdgeKind = Literal["produces", "consumes", "emits"]
PRODUCER_ID = "producer:clients"


@dataclass(frozen=True, slots=True)
class Node:
    id: str
    """``producer:clients``, ``event:<type>`` or ``function:<name>``: unique."""
    kind: NodeKind
    label: str
    description: str = ""
    versions: tuple[int, ...] = ()
    """For an event node: its declared versions."""


@dataclass(frozen=True, slots=True)
class Edge:
    source: str
    target: str
    kind: EdgeKind
    pattern: str | None = None
    """For ``consumes``: the subscription pattern, when the type came from one."""


@dataclass(frozen=True, slots=True)
class Graph:
    app: str
    nodes: tuple[Node, ...] = ()
    edges: tuple[Edge, ...] = ()
    _index: dict[str, Node] = field(default_factory=dict, repr=False, compare=False)

    def node(self, node_id: str) -> Node:
        if not self._index:
            self._index.update((n.id, n) for n in self.nodes)
        return self._index[node_id]

    def consumers(self, type_name: str) -> list[str]:
        """Names of the functions that consume ``type_name``."""
        return [
            e.target.removeprefix("function:")
            for e in self.edges
            if e.kind == "consumes" and e.source == f"event:{type_name}"
        ]

    def to_json(self) -> dict[str, Any]:
        return {
            "app": self.app,
            "nodes": [
                {
                    "id": n.id,
                    "kind": n.kind,
                    "label": n.label,
                    "description": n.description,
                    "versions": list(n.versions),
                }
                for n in self.nodes
            ],
            "edges": [
                {"source": e.source, "target": e.target, "kind": e.kind, "pattern": e.pattern}
                for e in self.edges
            ],
        }


def build_graph(app: App) -> Graph:
    """The topology of ``app`` (pure: reads the declarations only)."""
    from nerve.app import matches_pattern

    nodes: list[Node] = []
    edges: list[Edge] = []
    emitted = {t for f in app.functions.values() for t in f.emits}
    entry = [name for name in app.events if name not in emitted]
    if entry:
        nodes.append(Node(PRODUCER_ID, "producer", f"{app.name} clients", "publish from outside"))
    for name, latest in app.events.items():
        nodes.append(
            Node(
                f"event:{name}",
                "event",
                name,
                latest.description.strip(),
                tuple(sorted(app.versions.get(name, {latest.version: latest}))),
            )
        )
    for name in entry:
        edges.append(Edge(PRODUCER_ID, f"event:{name}", "produces"))
    for fn in app.functions.values():
        nodes.append(Node(f"function:{fn.name}", "function", fn.name, fn.description))
        seen: set[str] = set()
        for pattern in fn.subscription.patterns:
            for name in app.events:
                if name not in seen and matches_pattern(pattern, name):
                    seen.add(name)
                    via = pattern if pattern != name else None
                    edges.append(Edge(f"event:{name}", f"function:{fn.name}", "consumes", via))
        for name in sorted(fn.emits):
            edges.append(Edge(f"function:{fn.name}", f"event:{name}", "emits"))
    return Graph(app.name, tuple(nodes), tuple(edges))


# ---------------------------------------------------------------------------------------
# Renderers

_UNSAFE = re.compile(r"[^A-Za-z0-9_]")


def _mermaid_id(node_id: str) -> str:
    kind, _, name = node_id.partition(":")
    return f"{kind[0]}_{_UNSAFE.sub('_', name)}"


def _mermaid_text(text: str) -> str:
    return text.replace('"', "#quot;")


_EDGE_LABELS: dict[EdgeKind, str] = {
    "produces": "produces",
    "consumes": "delivers",
    "emits": "emits",
}


def to_mermaid(graph: Graph, *, direction: str = "LR") -> str:
    """A Mermaid flowchart: producers as boxes, event types as rounded nodes (the
    broker carries them), functions as subroutine boxes; labelled arrows."""
    if direction not in ("LR", "TD", "TB", "RL", "BT"):
        raise ValueError(f"direction must be LR, TD, TB, RL or BT, got {direction!r}")
    lines = [f"flowchart {direction}"]
    for node in graph.nodes:
        mid = _mermaid_id(node.id)
        if node.kind == "producer":
            lines.append(f'    {mid}["{_mermaid_text(node.label)}"]')
        elif node.kind == "event":
            versions = ",".join(f"v{v}" for v in node.versions)
            label = f"{node.label} {versions}" if versions and versions != "v1" else node.label
            lines.append(f'    {mid}("{_mermaid_text(label)}")')
        else:
            lines.append(f'    {mid}[["{_mermaid_text(node.label)}"]]')
    for edge in graph.edges:
        label = _EDGE_LABELS[edge.kind]
        if edge.pattern:
            label = f"{label} ({edge.pattern})"
        lines.append(
            f"    {_mermaid_id(edge.source)} -->|{_mermaid_text(label)}| {_mermaid_id(edge.target)}"
        )
    lines += [
        "    classDef producer fill:#eef,stroke:#557;",
        "    classDef event fill:#ffe,stroke:#aa5;",
        "    classDef function fill:#efe,stroke:#575;",
    ]
    for kind in ("producer", "event", "function"):
        ids = [_mermaid_id(n.id) for n in graph.nodes if n.kind == kind]
        if ids:
            lines.append(f"    class {','.join(ids)} {kind};")
    return "\n".join(lines) + "\n"


def _dot_text(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


_DOT_SHAPES = {"producer": "box", "event": "ellipse", "function": "component"}


def to_dot(graph: Graph) -> str:
    """Graphviz DOT (``dot -Tsvg``): the same graph, left to right."""
    lines = [f"digraph {_dot_text(graph.app)} {{", "    rankdir=LR;"]
    for node in graph.nodes:
        label = node.label
        if node.kind == "event" and node.versions and node.versions != (1,):
            label += " " + ",".join(f"v{v}" for v in node.versions)
        lines.append(
            f"    {_dot_text(node.id)} [label={_dot_text(label)}, shape={_DOT_SHAPES[node.kind]}];"
        )
    for edge in graph.edges:
        label = _EDGE_LABELS[edge.kind] + (f" ({edge.pattern})" if edge.pattern else "")
        lines.append(
            f"    {_dot_text(edge.source)} -> {_dot_text(edge.target)} [label={_dot_text(label)}];"
        )
    lines.append("}")
    return "\n".join(lines) + "\n"

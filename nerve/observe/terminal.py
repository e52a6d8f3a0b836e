"""``nerve trace``: a flow's causal chain as a tree in the terminal."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from rich.console import Group, RenderableType
from rich.text import Text
from rich.tree import Tree

from nerve.app import Subscription, matches_pattern
from nerve.event import Event
from nerve.observe.flow import FlowEvent, Outcome

__all__ = ["compact_line", "render_flows", "tail_filter"]

_STYLE = {
    "processed": ("✓", "green"),
    "dead-lettered": ("✗", "bold red"),
    "retrying": ("↻", "yellow"),
    "in-flight": ("…", "cyan"),
    "ready": ("·", "dim"),
}


def _clock(timestamp: float | None) -> str:
    if not timestamp:
        return "--:--:--.---"
    return datetime.fromtimestamp(timestamp).astimezone().strftime("%H:%M:%S.%f")[:-3]


def _ms(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms"
    return f"{seconds:.2f} s"


def _label(node: FlowEvent, start: float, highlight: str | None) -> Text:
    event = node.event
    when = event.time.timestamp() if event.time else None
    line = Text(_clock(when), style="dim")
    if when is not None and start:
        line.append(f" +{_ms(max(0.0, when - start))}", style="dim")
    line.append("  ")
    line.append(event.type, style="bold cyan")
    if event.subject:
        line.append(f"  {event.subject}", style="magenta")
    line.append(f"  {event.id}", style="bold" if event.id == highlight else "dim")
    return line


def _outcome(node: FlowEvent, outcome: Outcome) -> Text:
    mark, style = _STYLE.get(outcome.state, ("?", ""))
    line = Text(f"{mark} ", style=style)
    line.append(outcome.function, style="bold")
    line.append(f"  {outcome.state}", style=style)
    event_time = node.event.time.timestamp() if node.event.time else None
    if outcome.at is not None and event_time is not None and outcome.state != "retrying":
        line.append(f" after {_ms(max(0.0, outcome.at - event_time))}", style="dim")
    if outcome.state == "retrying" and outcome.at is not None:
        line.append(f" at {_clock(outcome.at)}", style="dim")
    if outcome.attempts:
        line.append(f"  attempts {outcome.attempts}", style="dim")
    if outcome.reason:
        line.append(f"  [{outcome.reason}]", style=style)
    if outcome.error:
        line.append(f"  {outcome.error[:200]}", style="red")
    if outcome.dead_letter_id:
        line.append(f"  (nerve dlq show {outcome.dead_letter_id})", style="dim")
    return line


def render_flows(roots: list[FlowEvent], highlight: str | None = None) -> RenderableType:
    """One tree per flow: each event (time, offset from the flow's start, type,
    subject, id), what each function did with it, then the events it caused."""
    trees: list[RenderableType] = []
    for root in roots:
        start = root.event.time.timestamp() if root.event.time else 0.0
        events = root.walk()
        failed = sum(1 for n in events for o in n.outcomes if o.state == "dead-lettered")
        title = Text(f"flow {root.correlation}", style="bold")
        title.append(f"  {len(events)} event{'s' if len(events) != 1 else ''}", style="dim")
        if failed:
            title.append(f"  {failed} dead-lettered", style="bold red")
        tree = Tree(title, guide_style="dim")
        _grow(tree, root, start, highlight)
        trees.append(tree)
    return Group(*trees)


def _grow(tree: Tree, node: FlowEvent, start: float, highlight: str | None) -> None:
    branch = tree.add(_label(node, start, highlight))
    for outcome in node.outcomes:
        branch.add(_outcome(node, outcome))
    for child in sorted(node.children, key=lambda c: c.position):
        _grow(branch, child, start, highlight)


# ---------------------------------------------------------------------------------------
# nerve tail: filters and the compact view


def tail_filter(
    pattern: str | None = None,
    subject: str | None = None,
    subscription: Subscription | None = None,
) -> Callable[[Event], bool] | None:
    """A predicate keeping events whose type matches ``pattern``, whose subject is
    ``subject`` (a trailing ``*`` matches by prefix), and that ``subscription`` (a
    function's) receives; None when nothing filters."""
    if pattern is None and subject is None and subscription is None:
        return None

    def keep(event: Event) -> bool:
        if pattern is not None and not matches_pattern(pattern, event.type):
            return False
        if subject is not None:
            actual = event.subject or ""
            if subject.endswith("*"):
                if not actual.startswith(subject[:-1]):
                    return False
            elif actual != subject:
                return False
        return subscription is None or subscription.matches(event)

    return keep


def compact_line(event: Event) -> Text:
    """One short line: time, type, subject or key, the end of the id."""
    when = event.time.astimezone().strftime("%H:%M:%S") if event.time else "--:--:--"
    line = Text(when, style="dim")
    line.append(f" {event.type}", style="cyan")
    where = event.subject or event.partitionkey
    if where:
        line.append(f" {where}", style="magenta")
    line.append(f" {event.id[-8:]}", style="dim")
    return line

"""Event contracts: versions, compatibility rules, the schema registry, upcasting.

The modules here read schemas and Apps; they never run anything (nothing here imports
:mod:`nerve.runtime`). :mod:`nerve.schema.asyncapi` and :mod:`nerve.schema.graph`
read an App and are imported on demand (``nerve.app`` itself imports this package).
"""

from nerve.schema.compat import (
    Compatibility,
    Finding,
    IncompatibleSchema,
    check_compatibility,
    check_readable,
    close_for_writing,
    render_findings,
)

__all__ = [
    "Compatibility",
    "Finding",
    "IncompatibleSchema",
    "check_compatibility",
    "check_readable",
    "close_for_writing",
    "render_findings",
]

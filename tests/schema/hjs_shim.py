"""A compatibility shim for hypothesis-jsonschema on current Hypothesis.

hypothesis-jsonschema 0.23.1 (the latest release) generates objects with
``cu.many(...)`` and calls ``elements.more()``; Hypothesis 6.150+ replaced ``more()``
by iteration inside a ``with`` block. :class:`_Many` gives it ``more()`` back on top of
the new API, element for element the same choices. It is installed only when the
running Hypothesis lacks ``more()``, by importing this module before
:func:`hypothesis_jsonschema.from_schema` is used; delete this file once hypothesis-jsonschema has
caught up.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from typing import Any

from hypothesis.internal.conjecture import utils as cu
from hypothesis_jsonschema import _from_schema


class _Many:
    def __init__(self, data: Any, **kwargs: Any) -> None:
        self._many = cu.many(data, **kwargs)
        self._many.__enter__()
        self._elements: Iterator[None] = iter(self._many)

    def more(self) -> bool:
        try:
            next(self._elements)
        except StopIteration:
            self._many.__exit__(None)
            return False
        return True

    def reject(self, why: str | None = None) -> None:
        self._many.reject(why)


if not hasattr(cu.many, "more"):
    shim = types.ModuleType("hypothesis_jsonschema_cu_shim")
    shim.__dict__.update(vars(cu))
    shim.many = _Many  # type: ignore[attr-defined]
    _from_schema.cu = shim  # type: ignore[attr-defined]

"""Strict JSON for every file this project writes: an undefined number (NaN, +-inf) is ``null``.

Python's ``json`` writes ``NaN`` / ``Infinity`` by default, which is not JSON (RFC 8259): jq,
JavaScript's ``JSON.parse`` and many loaders reject it. ``dumps`` replaces non-finite floats
(numpy scalars and MLX scalars included) by ``None`` and then encodes with ``allow_nan=False``,
so nothing non-standard can slip through. ``loads_strict`` is the matching strict reader.
"""

from __future__ import annotations

import json
import math
import numbers
from typing import Any


def strict(obj: Any) -> Any:
    """``obj`` with every non-finite real replaced by None (dicts, lists and tuples walked)."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        f = float(obj)
        return f if math.isfinite(f) else None
    if hasattr(obj, "item") and getattr(obj, "size", None) == 1:  # numpy / MLX scalar arrays
        return strict(obj.item())
    return obj


def _fallback(o):
    if hasattr(o, "item") and getattr(o, "size", None) == 1:
        return strict(o.item())
    return str(o)


def dumps(obj: Any, **kw) -> str:
    """Strict JSON text of ``obj`` (see the module docstring); other types become ``str``."""
    return json.dumps(strict(obj), allow_nan=False, default=_fallback, **kw)


def _reject(name: str):
    raise ValueError(f"not strict JSON: {name}")


def loads_strict(text: str) -> Any:
    """``json.loads`` that refuses ``NaN``, ``Infinity`` and ``-Infinity``."""
    return json.loads(text, parse_constant=_reject)

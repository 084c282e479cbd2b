"""When a calibration of this machine's rates (:mod:`.calibration`) was made, under which load, and
whether it is still good.

A calibration keeps the time it was measured (``measured_at``, UTC) and the 1-minute load average
just before (``load_before``: runnable threads, mostly other processes'). It is measured again when
it is older than :data:`MAX_AGE_S` (a day), or when it was made while other processes kept the cores
busy (a load above :data:`BUSY_SHARE` of the usable cores) and the load is below that now: its rates
were slower than this machine's. Under a load that stays, the rates measured under it are kept
(they are what a run will get).
"""

from __future__ import annotations

import calendar
import os
import time
from typing import Optional

#: a calibration older than this (seconds) is measured again
MAX_AGE_S = 24 * 3600
#: a load average above this share of the usable cores counts as busy
BUSY_SHARE = 0.5
#: the format of ``measured_at``
STAMP = "%Y-%m-%d %H:%M:%S UTC"


def current_load() -> Optional[float]:
    """The 1-minute load average, or None where the system has none."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def measured_epoch(record: dict) -> Optional[float]:
    """When ``record`` was measured, in seconds since the epoch (None: unknown)."""
    try:
        return float(calendar.timegm(time.strptime(record["measured_at"], STAMP)))
    except (KeyError, TypeError, ValueError):
        return None


def busy_load(record: dict) -> Optional[float]:
    """The load average ``record`` was measured under, where it counts as busy; else None."""
    load, cores = record.get("load_before"), record.get("identity", {}).get("cores") or 1
    first = load[0] if isinstance(load, (list, tuple)) and load else None
    return first if isinstance(first, (int, float)) and first > BUSY_SHARE * cores else None


def ago(seconds: float) -> str:
    """``just now``, ``12 min ago``, ``3 h ago``, ``2 days ago``."""
    if seconds < 90:
        return "just now"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.0f} h ago"
    return f"{seconds / 86400:.0f} days ago"


def when_measured(record: dict, now: Optional[float] = None) -> str:
    """``2026-12-07 21:00:03 UTC, 2 h ago`` and, where it was, ``, while other processes kept the cores
    busy (load 1.9 on 2 cores)``; '' for a record without a date."""
    t = measured_epoch(record)
    if t is None:
        return ""
    text = f"{record['measured_at']}, {ago((time.time() if now is None else now) - t)}"
    busy = busy_load(record)
    if busy is not None:
        text += f", while other processes kept the cores busy (load {busy:.1f} on {record['identity']['cores']} cores)"
    return text


def why_stale(record: dict, now: float, load_now: Optional[float]) -> Optional[str]:
    """Why a cached calibration is measured again (see the module docstring), or None to reuse it."""
    t = measured_epoch(record)
    if t is None:
        return "the cached rates have no date"
    if now - t > MAX_AGE_S:
        return f"the cached rates were measured {ago(now - t)}"
    busy, cores = busy_load(record), record["identity"]["cores"]
    if busy is not None and load_now is not None and load_now <= BUSY_SHARE * cores:
        return (
            f"the cached rates were measured while other processes kept the cores busy (load {busy:.1f} on "
            f"{cores} cores; {load_now:.1f} now)"
        )
    return None

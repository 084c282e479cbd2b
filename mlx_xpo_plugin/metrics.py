"""Metric names, windowed means, the JSONL log and the hand-off to upstream's TrainingCallback."""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from typing import Optional

from .errors import SaveFailed
from .jsonio import dumps

#: summed over the window (counts); every other key is a weighted mean over the window
COUNT_KEYS = ("judge/pairs", "judge/invalid", "judge/ties", "judge/seconds", "pairs/valid",
              "train/nonfinite_steps", "prompts/truncated")

COUNT_PREFIXES = ("judge/errors/",)  # judge/errors/<kind>: failed judge requests by kind


def is_count(key: str) -> bool:
    return key in COUNT_KEYS or key.startswith(COUNT_PREFIXES)


class MetricsWindow:
    """Collects per-step values between two reports; ``report()`` returns the means and resets.

    ``add(values, weight)``: each value counts with `weight` (e.g. the number of valid pairs for
    pair-level metrics); COUNT_KEYS are summed instead.
    """

    def __init__(self):
        self.reset()

    def reset(self):
        self._sum = defaultdict(float)
        self._w = defaultdict(float)

    @property
    def pending(self) -> bool:
        return bool(self._sum)

    def add(self, values: dict, weight: float = 1.0):
        for k, v in values.items():
            if v is None:
                continue
            v = float(v)
            if is_count(k):
                self._sum[k] += v
                self._w[k] = 1.0
            elif weight > 0 and math.isfinite(v):
                self._sum[k] += v * weight
                self._w[k] += weight

    def report(self) -> dict:
        out = {k: (self._sum[k] if is_count(k) else self._sum[k] / self._w[k])
               for k in self._sum if self._w[k] > 0}
        self.reset()
        return out


class JsonlLog:
    """Appends one JSON object per line and flushes it, so a crash loses nothing already written."""

    def __init__(self, path: str, truncate_after_step: Optional[int] = None):
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        if truncate_after_step is not None and os.path.exists(path):
            keep = []
            with open(path) as f:
                for line in f:
                    try:
                        if json.loads(line).get("step", 0) <= truncate_after_step:
                            keep.append(line)
                    except json.JSONDecodeError:
                        break
            with open(path, "w") as f:
                f.writelines(keep)
        elif truncate_after_step is None and os.path.exists(path):
            os.remove(path)

    def write(self, obj: dict):
        try:
            with open(self.path, "a") as f:
                f.write(dumps(obj) + "\n")
        except OSError as e:  # disk full / unwritable: stop cleanly (the runner says what is kept)
            raise SaveFailed(f"writing {self.path} failed: {e.strerror or e}") from e

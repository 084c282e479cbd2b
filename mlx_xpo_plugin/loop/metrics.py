"""Metric names, windowed means, the JSONL log and the hand-off to upstream's TrainingCallback."""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from typing import Optional

from mlx_xpo_plugin.errors import SaveFailed
from mlx_xpo_plugin.loop.jsonio import dumps

#: How each metric combines over the micro-batches of a step and the steps of a report window
#: (one table for every metric):
#:   count  summed (COUNT_KEYS, and every other ``judge/...`` number that is not a ratio);
#:   ratio  a mean weighted by the count it names (RATIO_WEIGHTS): the exploration term and the
#:          sampled KL and entropy are means over every scored pair (``pairs/scored``);
#:   pair   a mean over the valid (decided) pairs of the window (DPO loss, rewards, log-probs);
#:   step   a mean over the steps of the window (everything else: times, memory, alpha, ...).
COUNT_KEYS = (
    "judge/pairs",
    "judge/invalid",
    "judge/ties",
    "judge/seconds",
    "pairs/valid",
    "pairs/scored",
    "train/nonfinite_steps",
)
SCORED_PAIR_KEYS = ("loss/xpo", "exploration_bonus", "objective/kl", "objective/entropy", "objective/log_ratio")
RATIO_WEIGHTS = {
    "judge/position_consistency": "judge/both_orders_valid",
    "objective/scores_margin": "judge/scored_pairs",
    "judge/label_mass": "judge/pairs",  # a model judge's mean probability mass on its labels
    **{k: "pairs/scored" for k in SCORED_PAIR_KEYS},
}
PAIR_PREFIXES = ("rewards/", "logps/", "loss/", "objective/")
PAIR_KEYS = ("loss", "exploration_bonus")


def is_count(key: str) -> bool:
    return key in COUNT_KEYS or (key.startswith("judge/") and key not in RATIO_WEIGHTS)


def is_pair_metric(key: str) -> bool:
    return key not in RATIO_WEIGHTS and (key in PAIR_KEYS or key.startswith(PAIR_PREFIXES))


def merge_step_metrics(step: dict, new: dict) -> dict:
    """Add one micro-batch's judge numbers to the step's, in place: counts summed, ratios
    averaged with their counts as weights, anything else replaced."""
    old = dict(step)
    for k, v in new.items():
        if k in RATIO_WEIGHTS:
            w_key = RATIO_WEIGHTS[k]
            w_old, w_new = (old.get(w_key, 0.0) if k in old else 0.0), new.get(w_key, 0.0)
            total = w_old + w_new
            step[k] = (old.get(k, 0.0) * w_old + v * w_new) / total if total > 0 else v
        elif is_count(k):
            step[k] = old.get(k, 0.0) + v
        else:
            step[k] = v
    return step


class MetricsWindow:
    """Collects per-step values between two reports; ``report()`` returns the means and resets.

    ``add(values, weight)``: each value counts with `weight` (e.g. the number of valid pairs for
    pair-level metrics); counts are summed instead, and a ratio weighs its own count.
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
            w = float(values.get(RATIO_WEIGHTS[k], 0.0)) if k in RATIO_WEIGHTS else weight
            if is_count(k):
                self._sum[k] += v
                self._w[k] = 1.0
            elif w > 0 and math.isfinite(v):
                self._sum[k] += v * w
                self._w[k] += w

    def report(self) -> dict:
        out = {k: (self._sum[k] if is_count(k) else self._sum[k] / self._w[k]) for k in self._sum if self._w[k] > 0}
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

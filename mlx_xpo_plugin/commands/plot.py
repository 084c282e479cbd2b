"""``mlx-xpo plot``: the training curves in ``<adapter_path>/metrics.jsonl`` as one PNG.

The large first panel is the result: the validation win-rate against the reference at each
validation, with its 95% Wilson interval (loop/win_rate.py), and the win-rate on test.jsonl
(``test_metrics.json``, written by ``mlx-xpo eval`` or ``test: true``) when the folder has one. The
small panels follow the training reports: loss, reward accuracy and margin, the KL estimate, the
exploration bonus, alpha, the judge's invalid and tie rates, and seconds per step.

Each training row of metrics.jsonl holds the means over the steps since the previous one. A run
stopped between two reports writes a shorter window, and after a resume the next window is short
too; such consecutive short windows are merged (step-weighted means, counts summed) until they
cover the run's usual report interval, so that a resumed run shows no one-step point.
"""

from __future__ import annotations

import json
import os
from collections import Counter

from mlx_xpo_plugin.loop.win_rate import describe, interval

#: the small panels: (metrics key, title); ``judge rates`` and ``seconds`` are derived below
PANELS = (
    ("loss", "loss"),
    ("rewards/accuracies", "reward accuracy (chosen > rejected)"),
    ("rewards/margins", "reward margin"),
    ("objective/kl", "KL estimate (signed, see below)"),
    ("exploration_bonus", "exploration bonus"),
    ("alpha", "alpha"),
    ("judge rates", "judge: invalid and tie rates"),
    ("step_seconds", "seconds per step"),
)
COUNTS = ("judge/pairs", "judge/invalid", "judge/ties")

CAPTION = (
    "Win-rate: the share of decided validation pairs (policy sample vs reference sample) the judge gave to "
    "the policy; 0.5 = no change; bars: 95% interval. KL estimate: log pi(y) - log pi_ref(y) summed over each "
    "sampled completion,\naveraged over a report window: a single-sample estimate of KL(policy || reference), "
    "unbiased for the policy's own samples at temperature 1. It is signed: a window's mean can fall below 0 "
    "although the KL itself cannot\n(with xpo_bonus: paper, half of each pair is the reference's sample, "
    "whose term estimates minus KL(reference || policy))."
)


def read_rows(adapter_path: str) -> list[dict]:
    with open(os.path.join(adapter_path, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def training_points(rows: list[dict]) -> list[dict]:
    """The training report rows, consecutive short windows merged (see the module docstring)."""
    train = [r for r in rows if "step_seconds" in r]
    steps = [r["step"] for r in train]
    gaps = [b - a for a, b in zip([0] + steps, steps)]
    usual = max(Counter(gaps).items(), key=lambda kv: (kv[1], kv[0]))[0] if gaps else 1
    out, group = [], []
    for i, (row, gap) in enumerate(zip(train, gaps)):
        group.append((row, max(gap, 1)))
        if sum(g for _, g in group) >= usual or i == len(train) - 1:
            out.append(_merge(group))
            group = []
    return out


def _merge(group: list[tuple[dict, int]]) -> dict:
    """Rows covering ``gap`` steps each -> one row: counts summed, the rest step-weighted means."""
    merged: dict = {"step": group[-1][0]["step"]}
    keys = {k for row, _ in group for k in row if k != "step"}
    for k in keys:
        have = [(row[k], g) for row, g in group if isinstance(row.get(k), (int, float))]
        if not have:
            continue
        if k in COUNTS:
            merged[k] = sum(v for v, _ in have)
        else:
            merged[k] = sum(v * g for v, g in have) / sum(g for _, g in have)
    return merged


def _test_result(adapter_path: str):
    path = os.path.join(adapter_path, "test_metrics.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        res = json.load(f)
    return res if isinstance(res, dict) and "wins" in res else None


def _win_rate_panel(ax, rows: list[dict], test, last_step: int) -> None:
    vals = [r for r in rows if "val_wins" in r and interval(r["val_wins"], r.get("val_losses", 0))]
    if vals:
        xs = [r["step"] for r in vals]
        ps = [r["val_wins"] / (r["val_wins"] + r["val_losses"]) for r in vals]
        cis = [interval(r["val_wins"], r["val_losses"]) for r in vals]
        err = [[p - lo for p, (lo, _) in zip(ps, cis)], [hi - p for p, (_, hi) in zip(ps, cis)]]
        ax.errorbar(xs, ps, yerr=err, marker="o", capsize=4, label="validation (valid.jsonl)")
        ax.annotate(f"{ps[-1]:.2f}", (xs[-1], ps[-1]), textcoords="offset points", xytext=(8, 4))
    undecided = [r["step"] for r in rows if "val_wins" in r and not interval(r["val_wins"], r.get("val_losses", 0))]
    if undecided:
        ax.plot(undecided, [0.5] * len(undecided), "x", color="grey", ms=9, label="validation: no decided pair")
    if test is not None and interval(test["wins"], test["losses"]):
        p = test["wins"] / (test["wins"] + test["losses"])
        lo, hi = interval(test["wins"], test["losses"])
        x = last_step + max(0.5, 0.03 * last_step)  # beside the last validation, not on it
        ax.errorbar([x], [p], yerr=[[p - lo], [hi - p]], marker="D", color="C3", capsize=4, ls="none")
        ax.plot([], [], marker="D", color="C3", ls="none", label=f"test.jsonl: {describe(test)}")
    if not vals and test is None:
        ax.text(0.5, 0.5, "no validation with a decided pair", ha="center", transform=ax.transAxes)
    ax.axhline(0.5, color="grey", ls="--", lw=1, label="0.5: no change")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("win-rate vs reference, 95% interval")
    ax.set_xlabel("step")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)


def _small_panel(ax, points: list[dict], key: str, title: str) -> None:
    if key == "judge rates":
        pts = [p for p in points if p.get("judge/pairs")]
        for name, label in (("judge/invalid", "invalid"), ("judge/ties", "ties")):
            ax.plot([p["step"] for p in pts], [p.get(name, 0) / p["judge/pairs"] for p in pts], label=label)
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=8)
    else:
        pts = [(p["step"], p[key]) for p in points if key in p]
        if pts:
            ax.plot(*zip(*pts), marker="o" if len(pts) < 30 else None)
        else:
            ax.text(0.5, 0.5, "not in this run", ha="center", transform=ax.transAxes)
    if key == "rewards/accuracies":
        ax.set_ylim(-0.02, 1.02)
    if key == "objective/kl":
        ax.axhline(0.0, color="grey", lw=1)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)


def write_plot(adapter_path: str, output: str | None = None) -> str:
    """PNG of the curves in ``adapter_path``/metrics.jsonl; returns its path. ImportError without
    matplotlib (the optional 'plot' extra)."""
    import matplotlib.pyplot as plt

    fig = figure(adapter_path)
    out = output or os.path.join(adapter_path, "training.png")
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def figure(adapter_path: str):
    """The matplotlib figure :func:`write_plot` saves (its first axes: the win-rate panel)."""
    import matplotlib  # optional dependency: imported only here

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_rows(adapter_path)
    points = training_points(rows)
    last_step = max((r["step"] for r in rows), default=0)
    fig = plt.figure(figsize=(17, 10))
    grid = fig.add_gridspec(3, 4)
    _win_rate_panel(fig.add_subplot(grid[0:2, 0:2]), rows, _test_result(adapter_path), last_step)
    slots = [(0, 2), (0, 3), (1, 2), (1, 3), (2, 0), (2, 1), (2, 2), (2, 3)]
    for (r, c), (key, title) in zip(slots, PANELS):
        _small_panel(fig.add_subplot(grid[r, c]), points, key, title)
    fig.suptitle(f"training curves: {adapter_path}")
    fig.text(0.01, 0.005, CAPTION, fontsize=8, va="bottom")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig

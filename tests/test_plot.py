"""`mlx-xpo plot` (commands/plot.py): the win-rate first, with its interval and the eval result;
a resumed run's short windows merged, not drawn as one-step points."""

import json

import pytest

from mlx_xpo_plugin.commands.plot import training_points


def _train(step, loss, pairs=8, invalid=0):
    return {"step": step, "loss": loss, "step_seconds": 0.1, "judge/pairs": pairs, "judge/invalid": invalid}


def _val(step, wins, losses):
    return {"step": step, "val_wins": wins, "val_losses": losses, "val_ties": 0, "val_invalid": 0}


# steps_per_report 5, interrupted at step 7 (a 2-step window), resumed: the next window covers 8-10
RESUMED = [
    _val(0, 5, 5),
    _train(5, 0.70),
    _train(7, 0.60, pairs=2, invalid=1),
    _train(10, 0.50, pairs=6, invalid=0),
    _val(5, 0, 0),
    _val(10, 8, 2),
    _train(15, 0.40),
]


def test_short_windows_of_a_resumed_run_are_merged():
    pts = training_points(RESUMED)
    assert [p["step"] for p in pts] == [5, 10, 15]
    assert pts[1]["loss"] == pytest.approx((0.60 * 2 + 0.50 * 3) / 5)  # step-weighted
    assert pts[1]["judge/pairs"] == 8 and pts[1]["judge/invalid"] == 1  # counts summed
    assert training_points([_train(5, 1.0), _train(10, 0.9), _train(12, 0.8)])[-1]["step"] == 12  # the last stays


def test_plot_leads_with_the_win_rate_interval_and_the_eval_result(tmp_path):
    pytest.importorskip("matplotlib")
    from mlx_xpo_plugin.commands.plot import figure, write_plot

    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RESUMED))
    (tmp_path / "test_metrics.json").write_text(json.dumps({"wins": 30, "losses": 10, "ties": 2, "invalid": 0}))
    fig = figure(str(tmp_path))
    first = fig.axes[0]
    assert first.get_title() == "win-rate vs reference, 95% interval"
    labels = [t.get_text() for t in first.get_legend().get_texts()]
    assert "test.jsonl: 0.75 (95% CI 0.60-0.86; 30 won, 10 lost, 2 ties, 0 invalid)" in labels
    assert len(first.containers) == 2  # error bars: validation and test
    assert "validation: no decided pair" in labels  # the tie-only validation at step 5: marked, not dropped
    val_x = list(first.containers[0].lines[0].get_xdata())
    assert val_x == [0, 10]
    loss_x = list(next(a for a in fig.axes if a.get_title() == "loss").lines[0].get_xdata())
    assert loss_x == [5, 10, 15]  # no point at the interrupted step 7
    png = write_plot(str(tmp_path))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"

"""The win-rate's interval and the words a run prints about it (loop/win_rate.py), and the
progress bar's numbers (loop/run_loop.Reporter)."""

from types import SimpleNamespace

import pytest

from mlx_xpo_plugin.loop.win_rate import describe, interval, validation_line


def test_wilson_interval():
    lo, hi = interval(8, 2)
    assert lo == pytest.approx(0.4902, abs=1e-3) and hi == pytest.approx(0.9433, abs=1e-3)
    assert interval(0, 0) is None
    lo, hi = interval(5, 0)  # all won: a real interval, inside [0, 1]
    assert 0.5 < lo < 1.0 and hi == 1.0


def test_describe_and_the_validation_line():
    res = {"wins": 15, "losses": 6, "ties": 3, "invalid": 0, "win_rate": 15 / 21}
    assert describe(res) == "0.71 (95% CI 0.50-0.86; 15 won, 6 lost, 3 ties, 0 invalid)"
    assert validation_line(20, res) == f"step 20: validation win-rate vs reference {describe(res)}"
    assert validation_line(0, res).startswith("step 0 (untrained baseline): validation win-rate")
    ties = {"wins": 0, "losses": 0, "ties": 24, "invalid": 0, "win_rate": float("nan")}
    assert (
        validation_line(3, ties)
        == "step 3: validation win-rate vs reference no decided pair (0 won, 0 lost, 24 ties, 0 invalid)"
    )
    assert describe({"val_wins": 2, "val_losses": 2, "val_ties": 1, "val_invalid": 1}, prefix="val_").startswith(
        "0.50 ("
    )


def test_progress_bar_shows_no_nan_for_a_window_without_a_loss():
    from mlx_xpo_plugin.loop.run_loop import Reporter

    trainer = SimpleNamespace(rank=1, step=5, callback=None, settings=SimpleNamespace(adapter_path="unused"))
    rep = Reporter(trainer, resumed=False)
    shown = []
    bar = SimpleNamespace(set_postfix=shown.append)
    rep.add({"judge/pairs": 4, "judge/invalid": 4})  # a step whose every verdict was invalid: no loss
    rep.report(bar)
    assert shown == [{}]
    rep.add({"loss": 0.69, "rewards/accuracies": 0.5, "pairs/valid": 2})
    rep.report(bar)
    assert shown[-1] == {"loss": "0.6900", "acc": "0.50"}

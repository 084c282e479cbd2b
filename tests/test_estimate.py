"""``mlx-xpo estimate``: the cost model's formulas, the command, and the projection against a
measured tiny step."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import yaml

from mlx_xpo_plugin.commands import calibration, cli, estimate
from mlx_xpo_plugin.commands.tiny import PRESETS
from mlx_xpo_plugin.compute import cost


def rates(**kw) -> cost.Rates:
    base = dict(
        sgemm=100e9,
        stream=10e9,
        fwd_rate=((256, 50e9), (1024, 80e9)),
        bwd_rate=((256, 40e9), (1024, 60e9)),
        call=(0.0, 0.0),
        token=(0.0, 0.0),
        fwd=(0.0, 0.0),
        bwd=(0.0, 0.0),
        opt=(0.0, 0.0),
    )
    return cost.Rates(**{**base, **kw})


def test_shape_counts_qwen25_05b_parameters():
    s = cost.shape_of({**PRESETS["q05"], "model_type": "qwen2"})
    # per layer: q and o 896x896, k and v 896x128, the MLP 3 x 896x4864
    assert s.body == 24 * (2 * 896 * 896 + 2 * 896 * 128 + 3 * 896 * 4864) == 357_826_560
    assert s.head == 151936 * 896


def test_at_width_interpolates_in_log_width_and_clamps():
    table = ((256, 50.0), (1024, 80.0))
    assert cost.at_width(table, 64) == 50.0
    assert cost.at_width(table, 4096) == 80.0
    assert cost.at_width(table, 512) == pytest.approx(65.0)  # halfway in log2


def test_decode_is_weight_streaming_bound_then_flop_bound():
    s = cost.shape_of({**PRESETS["q05"]})
    w = s.body + s.head
    r = rates(fwd_rate=((64, 80e9),))
    # 4 rows, 1 prompt token, 11 tokens: 10 decode steps reading 4 bytes per weight at 10 GB/s
    t = cost.rollout_seconds(s, r, 4, 1, 11, 4.0)
    assert t == pytest.approx(2 * 4 * w / 80e9 + 10 * 4 * w / 10e9)
    # 512 rows: the products are bound by arithmetic, not by reading the weights
    t = cost.rollout_seconds(s, r, 512, 1, 11, 4.0)
    assert t == pytest.approx(2 * 512 * w / 80e9 + 10 * 2 * 512 * w / 100e9)


def test_step_phases_follow_the_formulas():
    s = cost.shape_of({**PRESETS["small"]})
    w = cost.Work(prompts=2, micro=3, prompt_len=20, completion_len=10)
    out = cost.step_seconds(s, rates(opt=(0.5, 0.0)), w)
    f = cost.forward_flops(s, 4, 20, 10)
    assert out["reference"] == pytest.approx(3 * f / 50e9)
    assert out["policy"] == pytest.approx(3 * 2 * f / 40e9)
    assert out["judge"] == 0.0 and out["other"] == 0.5
    assert out["total"] == pytest.approx(sum(out[p] for p in cost.PHASES))
    unknown = cost.step_seconds(s, rates(), cost.Work(2, 1, 20, 10, judge_kind="http"))
    assert unknown["judge"] is None and unknown["total"] > 0


@pytest.fixture
def run_yaml(tmp_path, tiny_model_path, prompt_data_dir, monkeypatch):
    monkeypatch.setenv("MLX_XPO_CACHE", str(tmp_path / "cache"))

    def write(**kw):
        cfg = {
            "model": tiny_model_path,
            "data": prompt_data_dir,
            "train": True,
            "judge": "mlx_xpo_plugin.rules:coin_reward",
            "batch_size": 2,
            "max_completion_length": 16,
            "iters": 50,
            "steps_per_eval": 20,
            **kw,
        }
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return str(path)

    return write


def test_estimate_command_reports_phases_steps_and_validations(run_yaml, capsys):
    assert cli.main(["estimate", "--config", run_yaml(), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["steps"] == 50
    assert res["validations"] == 1 + 50 // 20 + 1  # before the first step, every 20 steps, after the last
    assert set(cost.PHASES) <= set(res["step"]) and res["step"]["rollout"] > 0
    assert res["total_seconds"] == pytest.approx(50 * res["step"]["total"] + res["validation_seconds"])
    assert res["machine"]["identity"]["cores"] >= 1  # the cached calibration's key
    assert cli.main(["estimate", "--config", run_yaml()]) == 0  # the table, from the cache
    out = capsys.readouterr()
    assert "| **step** |" in out.out and "calibrating" not in out.err


def test_estimate_rejects_a_bad_setting_in_one_line(run_yaml, capsys):
    assert cli.main(["estimate", "--config", run_yaml(batch_size=0)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: batch_size") and "\n" not in err


def test_projection_line_only_for_runs_over_a_minute(run_yaml, monkeypatch):
    from mlx_xpo_plugin import config

    short = config.resolve("xpo", {}, set(), yaml.safe_load(open(run_yaml())))
    real_rates = calibration.rates
    real_tokens = estimate.mean_prompt_tokens
    monkeypatch.setattr(calibration, "rates", lambda *a, **k: pytest.fail("calibrated for a short run"))
    monkeypatch.setattr(estimate, "mean_prompt_tokens", lambda *a: pytest.fail("loaded a tokenizer"))
    assert estimate.projection_line(short) is None  # under a minute even at the slowest rates
    monkeypatch.setattr(calibration, "rates", real_rates)
    monkeypatch.setattr(estimate, "mean_prompt_tokens", real_tokens)
    long = config.resolve("xpo", {}, set(), yaml.safe_load(open(run_yaml(iters=200_000))))
    line = estimate.projection_line(long)
    assert line is not None and "s per step" in line and "200000 steps" in line


def _measured_tiny_steps(tmp_path, model, data, steps: int) -> list[float]:
    from mlx_xpo_plugin.api import train_method
    from mlx_xpo_plugin.xpo_trainer import XPO

    out = tmp_path / "run"
    s = dict(
        model=model,
        data=data,
        train=True,
        adapter_path=str(out),
        judge="mlx_xpo_plugin.rules:coin_reward",
        iters=steps,
        batch_size=2,
        max_completion_length=16,
        steps_per_report=1,
        steps_per_eval=10_000,
        val_batches=1,
        save_every=10_000,
        seed=0,
        test=False,
        fuse=False,
    )
    assert train_method(XPO, s, progress=False) == 0
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    # steps after the first (tracing, allocation) that scored a pair, as every estimated step does
    return [r["step_seconds"] for r in rows if r.get("step", 0) > 1 and "time/policy" in r]


def test_estimate_within_30_percent_of_a_measured_tiny_step(tmp_path, tiny_model_path, prompt_data_dir):
    """The projection of a tiny step against steps measured in this process. Timing on a shared
    machine is noisy in both directions, so both sides take their fastest repeats (calibration:
    best of each probe's repeats; the run: the lower quartile of 15 steps), and the comparison
    is tried up to three times, a fresh calibration and run each."""
    from mlx_xpo_plugin import config

    cfg = config.resolve(
        "xpo",
        {},
        set(),
        {
            "model": tiny_model_path,
            "data": prompt_data_dir,
            "train": True,
            "judge": "mlx_xpo_plugin.rules:coin_reward",
            "batch_size": 2,
            "max_completion_length": 16,
        },
    )
    plen = estimate.mean_prompt_tokens(tiny_model_path, prompt_data_dir)
    ratios = []
    for attempt in range(3):
        r, _ = calibration.rates(cache=tmp_path / f"cal{attempt}", refresh=True)
        projected = estimate.project(cfg, 100, r, plen)["step"]["total"]
        steps = _measured_tiny_steps(tmp_path / f"a{attempt}", tiny_model_path, prompt_data_dir, 16)
        measured = statistics.quantiles(steps, n=4)[0]
        ratios.append(projected / measured)
        if 0.7 <= ratios[-1] <= 1.3:
            return
    pytest.fail(f"projected / measured tiny step: {[round(x, 2) for x in ratios]} (none within 0.7-1.3)")


def test_a_run_over_a_minute_prints_its_projection_first(run_yaml, tmp_path, monkeypatch, capsys):
    """The training command's first line is the projection (here: every run counts as long, at
    the slow rates, so nothing is calibrated); under mlx.launch each process takes its share."""
    from mlx_xpo_plugin import config
    from mlx_xpo_plugin.api import train_method
    from mlx_xpo_plugin.xpo_trainer import XPO

    monkeypatch.setattr(estimate, "SHOW_ABOVE_S", -1.0)
    monkeypatch.setattr(calibration, "rates", lambda *a, **k: (estimate.SLOW, {}))
    path = run_yaml(iters=None, epochs=1, adapter_path=str(tmp_path / "ad"), steps_per_eval=100)
    cfg = config.resolve("xpo", {}, set(), yaml.safe_load(open(path)))
    one, two = estimate.projection_line(cfg), estimate.projection_line(cfg, world=2)
    steps = [int(line.split(" steps")[0].rsplit(" ", 1)[1]) for line in (one, two)]
    assert steps[1] == math.ceil(steps[0] / 2)  # each of 2 processes: half the prompts of an epoch
    capsys.readouterr()
    assert train_method(XPO, path, progress=False) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first == one


def test_a_calibration_made_without_the_few_row_kernel_is_not_reused_with_it(monkeypatch, tmp_path):
    """Decoding's rate depends on where its products run: the cache key says which."""
    from mlx_xpo_plugin.cpu import skinny

    monkeypatch.setattr(skinny, "STATE", {"isa": None})
    without = calibration.identity()
    monkeypatch.setattr(skinny, "STATE", {"isa": "avx2+fma"})
    with_kernel = calibration.identity()
    assert with_kernel["few_row_kernel"] == "avx2+fma"
    assert calibration.cache_path(without, tmp_path) != calibration.cache_path(with_kernel, tmp_path)

"""When this machine's rates were measured: `mlx-xpo estimate` and a run's projection line say it, and
a calibration older than a day, or made while other processes kept the cores busy (and they no longer
do), is measured again. Time and load are given to the calibration, never slept or made; `mlx-xpo
--help` lists every command."""

import dataclasses
import re
import time

import pytest
import yaml

from mlx_xpo_plugin.commands import calibration, calibration_age, cli, estimate

T0 = 1_796_000_000.0  # a fixed "now"
HOUR = 3600.0


@pytest.fixture
def measured(monkeypatch, tmp_path):
    """Calibrations counted instead of made (the slow rates stand in); the cache in tmp_path."""
    calls = []

    def fake():
        calls.append(1)
        return {**dataclasses.asdict(estimate.SLOW), "seconds": 0.0}

    monkeypatch.setattr(calibration, "measure", fake)
    monkeypatch.setenv("MLX_XPO_CACHE", str(tmp_path / "cache"))
    return calls


def cores() -> int:
    return calibration.identity()["cores"]


def test_a_calibration_is_reused_for_a_day_then_measured_again(measured):
    log = []
    _, first = calibration.rates(now=T0, load=0.0, log=log.append)
    assert len(measured) == 1 and first["measured_at"] == time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(T0))
    calibration.rates(now=T0 + 23 * HOUR, load=0.0, log=log.append)
    assert len(measured) == 1  # reused
    _, again = calibration.rates(now=T0 + 25 * HOUR, load=0.0, log=log.append)
    assert len(measured) == 2 and again["measured_at"] != first["measured_at"]
    assert log[-1] == (
        "calibrating this machine's rates (a few seconds; cached): the cached rates were measured 25 h ago"
    )


def test_a_calibration_made_under_load_is_measured_again_once_the_load_is_gone(measured):
    busy, idle = 0.9 * cores() + 0.5, 0.1 * cores()
    log = []
    _, record = calibration.rates(now=T0, load=busy, log=log.append)
    assert record["load_before"] == [busy]
    calibration.rates(now=T0 + HOUR, load=busy, log=log.append)
    assert len(measured) == 1  # still busy: the rates measured under that load are what a run gets
    _, record = calibration.rates(now=T0 + 2 * HOUR, load=idle, log=log.append)
    assert len(measured) == 2 and record["load_before"] == [idle]
    assert f"measured while other processes kept the cores busy (load {busy:.1f} on {cores()} cores" in log[-1]
    calibration.rates(now=T0 + 3 * HOUR, load=busy, log=log.append)
    assert len(measured) == 2  # made on idle cores: kept, whatever the load now


def test_when_measured_says_the_date_the_age_and_a_busy_machine():
    record = {"measured_at": "2026-12-07 20:00:00 UTC", "identity": {"cores": 2}, "load_before": [0.3]}
    now = calibration_age.measured_epoch(record) + 2 * HOUR
    assert calibration_age.when_measured(record, now) == "2026-12-07 20:00:00 UTC, 2 h ago"
    record["load_before"] = [1.9]
    assert calibration_age.when_measured(record, now) == (
        "2026-12-07 20:00:00 UTC, 2 h ago, while other processes kept the cores busy (load 1.9 on 2 cores)"
    )
    assert calibration_age.when_measured({}, now) == ""


def test_estimate_says_when_the_rates_were_measured(measured, tmp_path, tiny_model_path, prompt_data_dir, capsys):
    path = tmp_path / "run.yaml"
    settings = dict(model=tiny_model_path, data=prompt_data_dir, train=True, iters=50, judge="human")
    path.write_text(yaml.safe_dump(settings))
    assert cli.main(["estimate", "--config", str(path)]) == 0
    out = capsys.readouterr()
    assert "calibrating this machine's rates (a few seconds; cached): once per machine" in out.err
    assert re.search(r"\(measured \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC, just now(, while [^;]*)?; cached in ", out.out)


def test_a_runs_projection_line_says_when_the_rates_were_measured(monkeypatch, tmp_path, tiny_model_path):
    from mlx_xpo_plugin import config

    record = {"measured_at": "2026-12-07 20:00:00 UTC", "identity": {"cores": 2}, "load_before": [0.1]}
    monkeypatch.setattr(estimate, "SHOW_ABOVE_S", -1.0)
    monkeypatch.setattr(calibration, "rates", lambda *a, **k: (estimate.SLOW, record))
    monkeypatch.setattr(calibration, "cached", lambda *a, **k: record)
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text('{"prompt": "Say one!"}\n{"prompt": "Say two!"}\n')
    settings = dict(model=tiny_model_path, data=str(data), train=True, iters=9, judge="human")
    cfg = config.resolve("xpo", {}, set(), settings)
    line = estimate.projection_line(cfg)
    assert line.startswith("projected on this machine: ") and " 9 steps = about " in line
    assert re.search(r"rates measured 2026-12-07 20:00:00 UTC, (\d+ (h|days) ago)\)$", line), line


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    commands = re.search(r"\{([a-z,]+)\}", text).group(1).split(",")
    assert "estimate" in commands
    for name in commands:
        assert re.search(rf"^mlx-xpo {name} +\S", text, re.M), f"mlx-xpo --help does not list {name}"

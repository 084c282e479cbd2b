"""`mlx-xpo demo / plot / eval / schema` as a user runs them."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_xpo_plugin.commands import cli

MLX_XPO = str(Path(sys.executable).with_name("mlx-xpo"))


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    cache = tmp_path_factory.mktemp("cache")
    r = subprocess.run(
        [MLX_XPO, "demo", "--iters", "6", "--output", str(out), "--cache", str(cache)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    (out.parent / "demo.stderr").write_text(r.stderr)
    return out, cache, r.stdout


def test_demo_trains_through_the_upstream_cli_and_explains_results(demo_run):
    out, _, stdout = demo_run
    stderr = (out.parent / "demo.stderr").read_text()
    assert "mlx-xpo-plugin: train mode 'xpo' is provided by mlx-xpo-plugin" in stderr  # replaces the built-in
    assert "win-rate of the policy against the reference" in stdout and "0.5 is chance" in stdout
    rows = [json.loads(l) for l in open(out / "metrics.jsonl")]
    vals = [r for r in rows if "val_win_rate" in r]
    assert vals[0]["step"] == 0 and vals[-1]["step"] == 6  # baseline + end of training
    assert (out / "adapters.safetensors").is_file()


def test_demo_output_is_quiet_by_default_and_verbose_on_request(demo_run, monkeypatch, tmp_path):
    _, cache, stdout = demo_run
    assert "Loading model" not in stdout and "reference: the base weights" not in stdout
    assert stdout.count("adapters.safetensors") == 1 and stdout.count("metrics.jsonl") == 1  # said once
    calls = []
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd, env=None: calls.append(env) or 3)
    args = ["demo", "--cache", str(cache), "--output", str(tmp_path / "o"), "--iters", "1"]
    assert cli.main(args) == 3 and calls[-1] is None  # the environment as it is: quiet
    assert cli.main(["demo", "-v", *args[1:]]) == 3 and calls[-1]["MLX_XPO_VERBOSE"] == "1"


def test_demo_says_it_builds_the_model_when_it_does_and_reuses_it_after(demo_run, tmp_path):
    _, cache, stdout = demo_run
    assert "building the embedded tiny model" in stdout and "(cached)" not in stdout  # a fresh cache
    assert cli.demo_model_line(cache) == f"[demo] using the embedded tiny model and prompts cached under {cache}"
    assert "building" in cli.demo_model_line(tmp_path / "empty")


def test_demo_writes_the_plot_when_matplotlib_is_installed(demo_run):
    out, _, stdout = demo_run
    try:
        import matplotlib  # noqa: F401  (the optional 'plot' extra, which make installs)
    except ImportError:
        pytest.skip("matplotlib is not installed")
    png = out / "training.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"plot:        {png}" in stdout and "pip install" not in stdout


def test_plot_writes_a_png(demo_run):
    out, _, _ = demo_run
    r = subprocess.run([MLX_XPO, "plot", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    png = out / "training.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_plot_without_matplotlib_says_how_to_install(demo_run, monkeypatch, capsys):
    out, _, _ = demo_run
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert cli.main(["plot", str(out)]) == 2
    assert "pip install 'mlx-xpo-plugin[plot]'" in capsys.readouterr().err


def test_plot_of_a_folder_without_metrics(tmp_path, capsys):
    assert cli.main(["plot", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_eval_reports_win_rate_with_interval(demo_run):
    out, cache, _ = demo_run
    r = subprocess.run(
        [
            MLX_XPO,
            "eval",
            "--model",
            str(cache / "demo-model"),
            "--adapter-path",
            str(out),
            "--data",
            str(cache / "demo-data"),
            "--judge",
            "mlx_xpo_plugin.rules:prefer_letter_e",
            "--max-completion-length",
            "12",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["pairs"] == 24 and res["wins"] + res["losses"] + res["ties"] + res["invalid"] == 24
    lo, hi = res["win_rate_ci95"]
    assert 0 <= lo <= res["win_rate"] <= hi <= 1


def test_eval_takes_the_training_runs_settings_and_prints_only_json(demo_run):
    out, cache, _ = demo_run
    r = subprocess.run(
        [MLX_XPO, "eval", "--adapter-path", str(out), "--json"], capture_output=True, text=True, timeout=180
    )
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)  # stdout is the JSON object and nothing else
    assert res["pairs"] == 24 and 0 <= res["win_rate"] <= 1
    assert "eval: from the training run: model, data, judge" in r.stderr
    assert "max_completion_length=16" in r.stderr and "temperature=1.0" in r.stderr  # the demo's
    assert "Loading" not in r.stdout and "BLAS" not in r.stdout


def test_eval_without_a_training_run_names_what_is_missing(tmp_path, capsys):
    assert cli.main(["eval", "--adapter-path", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model: None is not valid; not given" in err and "pass --model" in err


def test_ctrl_c_in_a_command_is_one_line_and_exit_130(monkeypatch, capsys, tmp_path):
    def interrupted(ns):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "evaluate", interrupted)  # Ctrl-C while eval samples, judges or downloads
    assert cli.main(["eval", "--adapter-path", str(tmp_path)]) == 130
    assert capsys.readouterr().err == "error: interrupted\n"


def test_a_run_prints_the_win_rate_with_its_interval_and_never_nan(demo_run):
    _, _, stdout = demo_run
    assert "step 0 (untrained baseline): validation win-rate vs reference " in stdout
    assert re.search(r"step 6: validation win-rate vs reference (0|1)\.\d\d \(95% CI \d\.\d\d-\d\.\d\d; ", stdout)
    assert not re.search(r"\bnan\b", stdout, flags=re.I)
    assert re.search(r"step +0 \(untrained\): (0|1)\.\d\d \(95% CI", stdout)  # the demo's summary


def test_eval_prints_one_summary_line(demo_run, capsys, monkeypatch):
    out, _, _ = demo_run
    monkeypatch.setattr("mlx_xpo_plugin.commands.runner.run", lambda cfg, method, progress=True: 0)
    (out / "test_metrics.json").write_text(json.dumps({"wins": 0, "losses": 0, "ties": 24, "invalid": 0}))
    assert cli.main(["eval", "--adapter-path", str(out)]) == 0
    assert "win-rate vs reference on test.jsonl: no decided pair (0 won, 0 lost, 24 ties, 0 invalid)" in (
        capsys.readouterr().out
    )
    assert cli.main(["eval", "--adapter-path", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["win_rate_ci95"] is None  # not [NaN, NaN]
    (out / "test_metrics.json").unlink()


def test_eval_takes_the_training_yaml_whose_values_beat_the_runs(demo_run, capsys, monkeypatch, tmp_path):
    """The xpo YAML a run was trained with works for eval: its xpo-only settings (alpha, xpo_bonus)
    do not change an evaluation, and what it sets beats the training run's values."""
    out, cache, _ = demo_run
    seen = []
    monkeypatch.setattr("mlx_xpo_plugin.commands.runner.run", lambda cfg, method, progress=True: seen.append(cfg) or 0)
    (out / "test_metrics.json").write_text(json.dumps({"wins": 3, "losses": 1, "ties": 0, "invalid": 0}))
    yaml = tmp_path / "xpo.yaml"
    yaml.write_text("alpha: [1.0e-4, 1.0e-5]\nxpo_bonus: kl\ntemperature: 0.5\n")
    assert cli.main(["eval", "--adapter-path", str(out), "--config", str(yaml)]) == 0
    assert seen[-1].temperature == 0.5 and seen[-1].max_completion_length == 16  # the YAML's, the run's
    assert "temperature=" not in capsys.readouterr().err

    yaml.write_text(
        f"model: {cache / 'demo-model'}\ndata: {cache / 'demo-data'}\njudge: mlx_xpo_plugin.rules:prefer_letter_e\n"
    )
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "test_metrics.json").write_text(json.dumps({"wins": 1, "losses": 0, "ties": 0, "invalid": 0}))
    assert cli.main(["eval", "--adapter-path", str(tmp_path / "empty"), "--config", str(yaml)]) == 0
    assert seen[-1].model == str(cache / "demo-model")  # given by the YAML: no training run needed
    (out / "test_metrics.json").unlink()


def test_help_texts_are_complete_and_plain(capsys):
    subcommands = ("eval", "plot", "schema", "demo", "estimate")
    for argv in (["--help"], *([name, "--help"] for name in subcommands)):
        with pytest.raises(SystemExit):
            cli.main(argv)
        text = capsys.readouterr().out
        assert "``" not in text, argv
        assert not options_without_help(text), argv


def options_without_help(text: str) -> list:
    """The options of a --help text shown without a help text (argparse then prints the option
    alone, with no indented line under it)."""
    lines = text.splitlines() + [""]
    options = [(i, ln) for i, ln in enumerate(lines) if re.match(r"  -", ln)]
    return [
        ln.strip() for i, ln in options if not re.search(r"\S\s{2,}\S", ln) and not lines[i + 1].startswith(" " * 6)
    ]


def test_options_without_help_are_found():
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--bare")
    p.add_argument("--told", help="what it does")
    p.add_argument("--a-very-long-option-name-for-wrapping", help="its help on the next line")
    assert options_without_help(p.format_help()) == ["--bare BARE"]


def test_schema_command_prints_json_schema(capsys):
    assert cli.main(["schema"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["properties"]["alpha"]["default"] == 1e-5

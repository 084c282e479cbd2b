"""Nothing a user made is lost: another run's files are refused or moved aside, a refused start
writes nothing, results are kept, a resume drops what it redoes (CLI and Python API)."""

import json
import os
import re
import shlex
import subprocess
import types

import pytest
from test_cli_e2e import base_cfg, rows, run, small_data, write_cfg

from mlx_xpo_plugin.commands import prior_run
from mlx_xpo_plugin.commands.run_lock import created
from mlx_xpo_plugin.errors import ConfigError


def snapshot(folder):
    """{relative path: bytes} of every file under ``folder``."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, folder)] = open(p, "rb").read()
    return out


def test_a_rerun_on_a_finished_run_is_refused_then_start_over_moves_it_aside(tiny_model_path, tmp_path):
    data = small_data(tmp_path)
    out = tmp_path / "ad"
    cfg = write_cfg(tmp_path, **base_cfg(tiny_model_path, data, out))
    r = run(["--train-mode", "xpo", "--config", cfg])
    assert r.returncode == 0, r.stderr[-2000:]
    before = snapshot(out)
    assert len(rows(out)) >= 3

    r = run(["--train-mode", "xpo", "--config", cfg], timeout=60)
    assert r.returncode == 2, (r.stdout[-2000:], r.stderr[-2000:])
    errs = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(errs) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "a finished run: 4 of 4 steps" in errs[0]
    assert f"--resume-adapter-file {out} --iters 8 ;" in errs[0] and "--start-over" in errs[0]
    assert "Loading" not in r.stdout and "training" not in r.stdout  # refused before loading
    assert snapshot(out) == before  # nothing changed, no lock left

    (out / "notes.txt").write_text("mine")  # not a run's file: stays where it is
    r = run(["--train-mode", "xpo", "--config", cfg, "--start-over"])
    assert r.returncode == 0, r.stderr[-2000:]
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("ad.")]
    assert len(moved) == 1 and f"moved to {moved[0]}" in r.stdout
    assert snapshot(moved[0]) == before  # the old run, whole, in its own folder
    assert (out / "notes.txt").read_text() == "mine"
    assert [x["step"] for x in rows(out) if "loss" in x or "judge/pairs" in x] == [2, 4]  # one run's rows

    # asked for more steps than the finished run made: the refusal names the line that resumes it
    # with them, and that line, run exactly as printed, trains it on to the end
    r = run(["--train-mode", "xpo", "--config", cfg, "--iters", "6"], timeout=60)
    assert r.returncode == 2, r.stderr[-2000:]
    line = re.search(r"To continue it: (.*?) ;", r.stderr).group(1)
    assert line.endswith(f" --train-mode xpo --resume-adapter-file {out} --iters 6"), line
    r = subprocess.run(shlex.split(line), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming with iters=6 (was 4)" in r.stdout and "resuming from step 4 of 6" in r.stdout
    assert [x["step"] for x in rows(out) if "loss" in x or "judge/pairs" in x] == [2, 4, 6]


def test_the_python_api_follows_the_same_rule(tiny_model_path, tmp_path):
    from mlx_xpo_plugin.api import train_method
    from mlx_xpo_plugin.xpo_trainer import XPO

    out = tmp_path / "ad"
    cfg = base_cfg(tiny_model_path, small_data(tmp_path), out, iters=2)
    assert train_method(XPO, cfg, progress=False) == 0
    before = snapshot(out)
    with pytest.raises(ConfigError, match=r"holds a finished run: 2 of 2 steps.*--start-over"):
        train_method(XPO, cfg, progress=False)
    assert snapshot(out) == before
    assert train_method(XPO, {**cfg, "start_over": True}, progress=False) == 0
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("ad.")]
    assert len(moved) == 1 and snapshot(moved[0]) == before


def bad_json_data(tmp_path):
    d = tmp_path / "badjson"
    d.mkdir()
    (d / "train.jsonl").write_text('{"prompt": "ok"}\n{"prompt": \n')
    return str(d)


@pytest.mark.parametrize(
    "change,setting",
    [
        (lambda t, m, d: {"data": str(t / "no-such-folder")}, "data"),
        (lambda t, m, d: {"data": bad_json_data(t)}, "train.jsonl:2"),
        (lambda t, m, d: {"judge": "no_such_module_xyz:judge"}, "judge"),
        (lambda t, m, d: {"data": small_data(t), "batch_size": 8}, "batch_size"),
        (lambda t, m, d: {"resume_adapter_file": str(t)}, "resume_adapter_file"),
    ],
)
def test_a_refused_start_writes_nothing(tiny_model_path, prompt_data_dir, tmp_path, change, setting):
    out = tmp_path / "deep" / "ad"
    cfg = write_cfg(tmp_path, **{**base_cfg(tiny_model_path, prompt_data_dir, out), **change(tmp_path, 0, 0)})
    r = run(["--train-mode", "xpo", "--config", cfg], timeout=60)
    assert r.returncode == 2 and setting in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "deep").exists()  # no folder, no lock, no partial file


def test_a_refusal_after_loading_removes_the_folders_it_created(tmp_path):
    out = tmp_path / "a" / "b"
    with pytest.raises(ConfigError):
        with created(str(out)):
            (out / "adapter_config.json").write_text("{}")
            os.remove(out / "adapter_config.json")
            raise ConfigError("train_type", "full", "a quantized base")
    assert not (tmp_path / "a").exists()
    (tmp_path / "keep").mkdir()
    with pytest.raises(ConfigError):
        with created(str(tmp_path / "keep")):
            raise ConfigError("x", 1, "y")
    assert (tmp_path / "keep").is_dir()  # it was there before: kept


def test_a_resume_of_another_folder_into_a_folder_with_a_run_is_refused(tmp_path):
    (tmp_path / "a" / "checkpoint").mkdir(parents=True)
    (tmp_path / "a" / "checkpoint" / "state.json").write_text(json.dumps({"step": 3, "iters": 9, "final": False}))
    (tmp_path / "b" / "checkpoint").mkdir(parents=True)
    (tmp_path / "b" / "checkpoint" / "state.json").write_text("{}")
    cfg = types.SimpleNamespace(
        train=True, start_over=False, adapter_path=str(tmp_path / "a"), resume_adapter_file=None
    )
    with pytest.raises(ConfigError, match=r"an interrupted run: 3 of 9 steps.*To continue it: RESUME ;"):
        prior_run.check(cfg, lambda c, mode, processes: "RESUME")
    prior_run.check(types.SimpleNamespace(**{**vars(cfg), "resume_adapter_file": str(tmp_path / "a")}), None)
    with pytest.raises(ConfigError, match="holds an interrupted run"):
        prior_run.check(
            types.SimpleNamespace(**{**vars(cfg), "resume_adapter_file": str(tmp_path / "b")}), lambda *a: "R"
        )


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    from mlx_xpo_plugin.loop.checkpoints import check_resume

    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "state.json").write_text(json.dumps({"step": 2, "fingerprint": {"model": "/m/one"}}))
    with pytest.raises(ConfigError, match=r"made with model='/m/one', this run has model='/m/two'"):
        check_resume(str(tmp_path), types.SimpleNamespace(model="/m/two"))


@pytest.mark.parametrize("theirs, how", [(2, "under mlx.launch -n 2"), (4, "under mlx.launch -n 4")])
def test_a_checkpoint_of_another_number_of_processes_is_refused(tmp_path, theirs, how):
    """Like batch_size, the number of processes decides each step's prompts and the step count."""
    from mlx_xpo_plugin.loop.checkpoints import check_resume, fingerprint

    cfg = types.SimpleNamespace(model="/m/one")
    (tmp_path / "checkpoint").mkdir()
    state = {"step": 2, "fingerprint": {**fingerprint(cfg), "processes": theirs}}
    (tmp_path / "checkpoint" / "state.json").write_text(json.dumps(state))
    want = f"made by {theirs} processes, this run has 1: resume it {how} (the prompts of each step"
    with pytest.raises(ConfigError, match=re.escape(want)):
        check_resume(str(tmp_path), cfg)
    state["fingerprint"].pop("processes")  # a checkpoint written before the count was recorded
    (tmp_path / "checkpoint" / "state.json").write_text(json.dumps(state))
    assert check_resume(str(tmp_path), cfg)[1]["step"] == 2


def test_a_new_test_result_keeps_the_previous_one(tmp_path, capsys):
    p = tmp_path / "test_metrics.json"
    p.write_text('{"win_rate": 0.7}')
    prior_run.keep_previous(str(p))
    kept = [x for x in tmp_path.iterdir() if x.name.startswith("test_metrics.")]
    assert not p.exists() and len(kept) == 1 and kept[0].read_text() == '{"win_rate": 0.7}'
    assert f"kept as {kept[0]}" in capsys.readouterr().out
    assert prior_run.run_files(str(tmp_path)) == [kept[0].name]  # part of the run's files


def test_a_fused_model_is_replaced_only_when_the_new_one_is_complete(tmp_path):
    (tmp_path / "fused").mkdir()
    (tmp_path / "fused" / "old.txt").write_text("old")
    (tmp_path / "fused.partial").mkdir()
    (tmp_path / "fused.partial" / "new.txt").write_text("new")
    assert prior_run.replace_folder(str(tmp_path / "fused.partial"), str(tmp_path / "fused")) is True
    assert sorted(os.listdir(tmp_path)) == ["fused"] and os.listdir(tmp_path / "fused") == ["new.txt"]


def test_a_resume_drops_the_periodic_copies_it_redoes(tmp_path):
    for step in (1, 2, 3):
        (tmp_path / f"{step:07d}_adapters.safetensors").write_text("x")
    assert prior_run.drop_copies_after(str(tmp_path), 1) == [
        "0000002_adapters.safetensors",
        "0000003_adapters.safetensors",
    ]
    assert os.listdir(tmp_path) == ["0000001_adapters.safetensors"]


def test_a_resume_moves_the_earlier_results_aside_and_makes_again_what_its_settings_ask(
    tiny_model_path, tmp_path, capsys
):
    """The earlier part's test result, plot and fused model describe older adapters: a resume
    moves them aside under their date and says so; test (on) and the plot are made again, fuse
    (off) is not. The Python API resumes from the folder alone."""
    from mlx_xpo_plugin.api import train_method
    from mlx_xpo_plugin.xpo_trainer import XPO

    out = tmp_path / "ad"
    cfg = base_cfg(tiny_model_path, small_data(tmp_path), out, iters=2, test=True, test_batches=1)
    assert train_method(XPO, cfg, progress=False) == 0
    old_test = (out / "test_metrics.json").read_text()
    (out / "training.png").write_bytes(b"the plot of step 2")
    (out / "fused").mkdir()
    (out / "fused" / "model.safetensors").write_text("fused at step 2")
    capsys.readouterr()

    assert train_method(XPO, {"resume_adapter_file": str(out), "iters": 4}, progress=False) == 0
    said = capsys.readouterr().out
    stamp = r"\d{8}-\d{6}"
    (test,) = [p for p in out.iterdir() if re.fullmatch(rf"test_metrics\.{stamp}\.json", p.name)]
    (plot,) = [p for p in out.iterdir() if re.fullmatch(rf"training\.{stamp}\.png", p.name)]
    (fused,) = [p for p in out.iterdir() if re.fullmatch(rf"fused\.{stamp}", p.name)]
    assert test.read_text() == old_test and plot.read_bytes() == b"the plot of step 2"
    assert (fused / "model.safetensors").read_text() == "fused at step 2" and not (out / "fused").exists()
    (line,) = [x for x in said.splitlines() if x.startswith("resume: the results made before step 2")]
    assert f"test_metrics.json -> {test.name}, training.png -> {plot.name}, fused -> {fused.name}" in line
    assert line.endswith("made again when this run finishes: test_metrics.json, training.png")
    assert f"; {out / 'test_metrics.json'}" in said and json.load(open(out / "test_metrics.json"))["pairs"] >= 1
    assert f"plot: {out / 'training.png'} (made again" in said
    assert (out / "training.png").read_bytes()[:4] == b"\x89PNG"
    assert {test.name, plot.name, fused.name} <= set(prior_run.run_files(str(out)))  # start_over moves them too


def test_the_end_of_a_run_names_only_files_that_were_written(tmp_path, capsys):
    from mlx_xpo_plugin.commands import runner

    (tmp_path / "metrics.jsonl").write_text('{"step": 3}\n')  # no pair was decided: no completions.jsonl
    cfg = types.SimpleNamespace(adapter_path=str(tmp_path), train_mode="xpo")
    trainer = types.SimpleNamespace(
        settings=types.SimpleNamespace(iters=3),
        guard=types.SimpleNamespace(judgeless=3, status=None),
        judge=types.SimpleNamespace(last_invalid='unparsed answer "I prefer the first"'),
    )
    result = {"updates": 0, "interrupted": False, "stop_reason": None, "step": 3, "stopped_at": 3}
    assert runner.report(cfg, trainer, result) == 3
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.endswith(
        """the judge's last invalid answer: unparsed answer "I prefer the first"\n"""
    )
    assert f"metrics: {tmp_path / 'metrics.jsonl'}" in out
    assert "samples" not in out and "completions.jsonl" not in out and "adapters:" not in out

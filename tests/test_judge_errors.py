"""One meaning for judge failure: per-pair errors counted by class and shown; a judge failing every
pair from the start stops at once; a run without an update never exits 0."""

import json

from test_cli_e2e import base_cfg, rows, run, small_data, write_cfg

JUDGES = """
import os

calls = {"train": 0}


def boom(prompt, a, b):
    return 1 // 0


def never_valid(prompt, a, b):
    return 2


def breaks_after_step_1(prompt, a, b):
    if "train" in prompt and os.environ.get("BREAK_JUDGE"):
        calls["train"] += 1
        if calls["train"] > 2:
            raise ConnectionError("backend gone")
    return 0 if a.count("e") >= b.count("e") else 1
"""


def judge_file(tmp_path):
    p = tmp_path / "judges_here.py"
    p.write_text(JUDGES)
    return str(p)


def test_a_function_judge_raising_on_every_pair_stops_at_step_1_with_exit_3(tiny_model_path, tmp_path):
    out = tmp_path / "ad"
    spec = f"{judge_file(tmp_path)}:boom"
    cfg = write_cfg(tmp_path, **base_cfg(tiny_model_path, small_data(tmp_path), out, judge=spec))
    r = run(["--train-mode", "xpo", "--config", cfg])
    assert r.returncode == 3, (r.stdout[-2000:], r.stderr[-2000:])
    text = r.stdout + r.stderr
    assert "step 1: no valid pair (2 errors: ZeroDivisionError: integer division or modulo by zero; 0 invalid" in text
    assert f"the judge {spec!r} failed on every pair of step 1" in text
    assert "stopped at step 1 of 4" in text and "checkpoint of step 0 saved" in text
    assert "adapters: " not in r.stdout and "the adapters in" in r.stderr and "are untrained" in r.stderr
    assert "Traceback" not in text
    steps = [x for x in rows(out) if "judge/pairs" in x]
    assert steps and steps[-1]["judge/errors/ZeroDivisionError"] == 2


def test_a_run_without_a_single_update_never_exits_0(tiny_model_path, tmp_path):
    spec = f"{judge_file(tmp_path)}:never_valid"  # answers, but never a valid verdict
    cfg = write_cfg(tmp_path, **base_cfg(tiny_model_path, small_data(tmp_path), tmp_path / "ad", judge=spec))
    r = run(["--train-mode", "xpo", "--config", cfg])
    assert r.returncode == 3, (r.stdout[-2000:], r.stderr[-2000:])
    assert "no step of this run made an update (4 of 4 steps without a valid pair)" in r.stderr
    assert "adapters: " not in r.stdout


def test_a_judgeless_streak_names_the_step_it_stopped_at_and_resume_drops_what_it_redoes(tiny_model_path, tmp_path):
    out = tmp_path / "ad"
    spec = f"{judge_file(tmp_path)}:breaks_after_step_1"
    kw = dict(judge=spec, iters=8, max_judgeless_steps=3, save_every=1, steps_per_report=1, steps_per_eval=100)
    cfg = write_cfg(tmp_path, **base_cfg(tiny_model_path, small_data(tmp_path, 16), out, **kw))
    r = run(["--train-mode", "xpo", "--config", cfg], env={"BREAK_JUDGE": "1"})
    assert r.returncode == 3, (r.stdout[-2000:], r.stderr[-2000:])
    assert "stopped at step 4 of 8" in r.stdout and "checkpoint of step 1 saved" in r.stdout
    assert "(steps 2-4, max_judgeless_steps=3)" in r.stdout and "6 errors (6 ConnectionError), 0 invalid" in r.stdout
    assert "last error: ConnectionError: backend gone" in r.stdout
    assert "step 2: no valid pair (2 errors: ConnectionError: backend gone" in r.stdout
    assert (out / "0000003_adapters.safetensors").exists()  # a copy of a step that is redone

    r = run(["--train-mode", "xpo", "--config", cfg, "--resume-adapter-file", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resume: removed 3 periodic adapter copies of steps after 1" in r.stdout
    steps = [x["step"] for x in rows(out) if "judge/pairs" in x]
    assert steps == list(range(1, 9))  # rows of the redone steps were dropped, none repeated


def test_eval_with_a_judge_failing_every_pair_exits_3_and_keeps_every_result(tiny_model_path, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    mlx_xpo = str(Path(sys.executable).with_name("mlx-xpo"))
    out, data = tmp_path / "ad", small_data(tmp_path)
    cfg = write_cfg(tmp_path, **base_cfg(tiny_model_path, data, out, iters=2))
    assert run(["--train-mode", "xpo", "--config", cfg]).returncode == 0

    def evaluate(judge):
        args = [mlx_xpo, "eval", "--adapter-path", str(out), "--judge", judge, "--json"]
        return subprocess.run(args, capture_output=True, text=True, timeout=180)

    r = evaluate(f"{judge_file(tmp_path)}:boom")
    assert r.returncode == 3, r.stderr[-2000:]
    assert "failed on every pair (4 errors: ZeroDivisionError: integer division or modulo by zero)" in r.stderr
    assert not (out / "test_metrics.json").exists() and r.stdout == ""  # no result that looks like one
    results = []
    for _ in range(2):
        r = evaluate("mlx_xpo_plugin.rules:prefer_letter_e")
        assert r.returncode == 0, r.stderr[-2000:]
        results.append(r.stdout.strip())
    kept = sorted(out.glob("test_metrics.*.json"))
    assert len(kept) == 1 and "the previous result was kept as" in r.stderr
    assert json.loads(kept[0].read_text())["pairs"] == json.loads(results[0])["pairs"] == 4


def test_a_judge_url_with_nothing_listening_stops_at_step_1(tiny_model_path, tmp_path):
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    kw = dict(judge=url, judge_config={"max_retries": 0}, iters=20)
    cfg = write_cfg(tmp_path, **base_cfg(tiny_model_path, small_data(tmp_path), tmp_path / "ad", **kw))
    r = run(["--train-mode", "xpo", "--config", cfg])
    assert r.returncode == 3, (r.stdout[-2000:], r.stderr[-2000:])
    assert (
        f"stopped at step 1 of 20: the judge '{url}' failed on every pair of step 1 (2 errors: connection_refused"
        in (r.stdout)
    )
    assert "adapters: " not in r.stdout and "Traceback" not in r.stderr

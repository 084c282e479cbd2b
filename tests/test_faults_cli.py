"""Faults through the real command line: SIGKILL after a periodic checkpoint, a judge whose
endpoint goes away, Ctrl-C of a run given its settings as flags, two runs on one adapter_path.
Every resume line a run prints is run here exactly as printed."""

import json
import os
import shlex
import signal
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import mlx.core as mx
import numpy as np
from test_cli_e2e import BLOCKING_JUDGE, TRAIN, base_cfg, rows, run, wait_for, write_cfg

from mlx_xpo_plugin.loop.jsonio import loads_strict


def adapters(path):
    return mx.load(str(path / "adapters.safetensors"))


def printed_resume(text: str) -> str:
    """The command after the last ``resume with: `` of a run's output."""
    lines = [x for x in text.splitlines() if "resume with: " in x]
    assert lines, text[-3000:]
    return lines[-1].split("resume with: ", 1)[1]


def run_as_printed(line: str, env=None, timeout=300):
    return subprocess.run(
        shlex.split(line), capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


def test_the_line_printed_after_ctrl_c_resumes_the_flags_settings_in_their_folder(
    tiny_model_path, prompt_data_dir, tmp_path
):
    """The YAML says adapter_path a and 400 steps; the flags say b, 6 steps and another learning
    rate. The printed line, run as printed, resumes b with the flags' settings and writes only there."""
    a, b, gate = tmp_path / "a", tmp_path / "b", tmp_path / "gate"
    gate.mkdir()
    (tmp_path / "blocking_judge.py").write_text(BLOCKING_JUDGE)
    kw = dict(iters=400, steps_per_report=1, steps_per_eval=1000, judge=f"{tmp_path / 'blocking_judge.py'}:judge")
    cfg = write_cfg(tmp_path, **base_cfg(tiny_model_path, prompt_data_dir, a, **kw))
    flags = ["--adapter-path", str(b), "--iters", "6", "--learning-rate", "2e-3"]
    first = ["--train-mode", "xpo", "--config", cfg, *flags]
    env = {"GATE_DIR": str(gate)}
    err_path = tmp_path / "stderr.txt"
    with open(err_path, "w") as err_file:
        p = subprocess.Popen(
            [TRAIN, *first], stdout=subprocess.PIPE, stderr=err_file, text=True, env={**os.environ, **env}
        )
        try:
            wait_for(lambda: (b / "metrics.jsonl").exists() and len(rows(b)) >= 3)  # step 0's validation, 1, 2
            (gate / "block").touch()  # the next judge call holds its step open: Ctrl-C lands inside it
            wait_for(lambda: (gate / "blocked").exists())
            p.send_signal(signal.SIGINT)
            wait_for(lambda: "finishing this step" in err_path.read_text())
            (gate / "block").unlink()
            stdout, _ = p.communicate(timeout=120)
        finally:
            p.kill()
    assert p.returncode == 130, err_path.read_text()[-3000:]
    line = printed_resume(stdout)
    assert line.endswith(f" --train-mode xpo --resume-adapter-file {b}") and "--config" not in line, line
    step = json.load(open(b / "checkpoint" / "state.json"))["step"]
    assert 3 <= step < 6 and not a.exists()

    r = run(first, env=env, timeout=60)  # the same command again: refused, naming the same line
    assert r.returncode == 2 and f"holds an interrupted run: {step} of 6 steps" in r.stderr, r.stderr[-2000:]
    assert f"To continue it: {line} ;" in r.stderr

    r = run_as_printed(line, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming from step {step} of 6" in r.stdout and "resuming with" not in r.stdout
    state = json.load(open(b / "checkpoint" / "state.json"))
    assert state["step"] == 6 and state["final"] and state["config"]["learning_rate"] == 2e-3
    assert [x["step"] for x in rows(b) if "judge/pairs" in x] == [1, 2, 3, 4, 5, 6]  # nothing lost or repeated
    assert not a.exists()  # the YAML's folder was never written


def test_sigkill_after_a_periodic_checkpoint_then_resume_is_bit_identical_with_a_model_judge(
    tiny_model_path, prompt_data_dir, tmp_path
):
    # the judge is a local MLX model (the tiny model: it shuffles pair order with its own RNG)
    kw = dict(
        iters=12, save_every=1, steps_per_report=1, steps_per_eval=4, val_batches=1, judge=tiny_model_path, seed=3
    )
    # bit for bit needs one BLAS thread count in both parts: the fast BLAS otherwise follows the
    # machine's idle cores at every rollout, and OpenBLAS rounds differently on another count
    same_threads = {"OPENBLAS_NUM_THREADS": "1"}
    full, part = tmp_path / "full", tmp_path / "part"
    (tmp_path / "f").mkdir()
    cfg_full = write_cfg(tmp_path / "f", **base_cfg(tiny_model_path, prompt_data_dir, full, **kw))
    r = run(["--train-mode", "xpo", "--config", cfg_full], env=same_threads)
    assert r.returncode == 0, r.stderr[-3000:]

    (tmp_path / "p").mkdir()
    cfg = write_cfg(tmp_path / "p", **base_cfg(tiny_model_path, prompt_data_dir, part, **kw))
    p = subprocess.Popen(
        [TRAIN, "--train-mode", "xpo", "--config", cfg],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **same_threads},
    )
    state = part / "checkpoint" / "state.json"
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            try:
                if json.load(open(state))["step"] >= 3:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.01)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        p.kill()
    assert p.returncode == -signal.SIGKILL
    killed_at = json.load(open(state))["step"]
    assert 3 <= killed_at < 12  # killed mid-run, after a periodic checkpoint
    r = run(["--train-mode", "xpo", "--config", cfg, "--resume-adapter-file", str(part)], env=same_threads)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resume:" not in r.stdout  # the model judge's state was restored, nothing to warn about
    want, got = adapters(full), adapters(part)
    assert sorted(want) == sorted(got)
    assert all(np.array_equal(np.array(want[k]), np.array(got[k])) for k in want)  # bit for bit
    steps = [x["step"] for x in rows(part) if "loss" in x or "judge/pairs" in x]
    assert steps == list(range(1, 13))  # nothing lost, nothing repeated


def endpoint_serving(n_requests, port=0):
    """An endpoint on ``port`` (0: a free one) answering "0" to its first `n_requests` requests,
    then gone (connection refused)."""

    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            body = json.dumps({"choices": [{"message": {"content": "0"}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = HTTPServer(("127.0.0.1", port), H)

    def serve():
        for _ in range(n_requests):
            server.handle_request()
        server.server_close()

    threading.Thread(target=serve, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"


def test_a_judge_that_goes_away_stops_the_run_with_a_checkpoint_before_it(tiny_model_path, prompt_data_dir, tmp_path):
    out = tmp_path / "ad"
    # 2 requests validate step 0, then 2 per step: the endpoint answers steps 1-3 and then is gone
    url = endpoint_serving(2 + 3 * 2)
    cfg = write_cfg(
        tmp_path,
        **base_cfg(
            tiny_model_path,
            prompt_data_dir,
            out,
            iters=8,
            steps_per_report=1,
            steps_per_eval=1000,
            val_batches=1,
            max_judgeless_steps=3,
            judge=url,
            judge_config={"max_retries": 0, "timeout": 5},
        ),
    )
    r = run(["--train-mode", "xpo", "--config", cfg])
    assert r.returncode == 3, (r.stdout[-3000:], r.stderr[-3000:])
    assert "Traceback" not in r.stderr
    stop = [l for l in r.stdout.splitlines() if l.startswith("stopped at step")]
    assert len(stop) == 1, r.stdout[-3000:]
    assert stop[0].startswith(
        f"stopped at step 6 of 8: the judge '{url}' gave no valid pair in 3 "  # the step it stopped at
        "consecutive steps (steps 4-6, max_judgeless_steps=3): 6 pairs, 6 errors "
        "(6 connection refused), 0 invalid answers, 0 ties; last error: connection_refused: "
    ), stop[0]
    assert stop[0].endswith("checkpoint of step 3 saved.")
    assert "Connection refused" in stop[0] and "redoes those steps" in stop[0]
    assert f"--resume-adapter-file {out}" in r.stdout
    state = json.load(open(out / "checkpoint" / "state.json"))
    assert state["step"] == 3 and state["position"] == 6 and not state["final"]
    train = [loads_strict(l) for l in open(out / "metrics.jsonl")]
    refused = {x["step"]: x.get("judge/errors/connection_refused") for x in train if "judge/pairs" in x}
    assert refused == {1: None, 2: None, 3: None, 4: 2, 5: 2, 6: 2}

    # the endpoint is back at its address: the printed line, run as printed, redoes steps 4-6 and
    # reaches the end (2 requests a step, 2 for the last validation)
    endpoint_serving(5 * 2 + 2, port=int(url.rsplit(":", 1)[1]))
    r = run_as_printed(printed_resume(r.stdout))
    assert r.returncode == 0, r.stderr[-3000:]
    steps = [x["step"] for x in rows(out) if "judge/pairs" in x]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8]
    assert all("judge/errors/connection_refused" not in x for x in rows(out))

    # an endpoint that moved (another port) may be given again: the run says so
    url2 = endpoint_serving(2 * 2 + 2)
    r = run(["--train-mode", "xpo", "--resume-adapter-file", str(out), "--judge", url2, "--iters", "10"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming with iters=10 (was 8), judge='{url2}' (was '{url}')" in r.stdout


GATED_JUDGE = """
import os, time
def judge(prompt, a, b):
    open(os.environ["GATE"], "a").close()  # says: training is under way
    time.sleep(0.2)
    return 0
"""


def test_a_second_run_on_the_same_adapter_path_is_refused_and_a_killed_run_leaves_no_lock(
    tiny_model_path, prompt_data_dir, tmp_path
):
    out, gate = tmp_path / "ad", tmp_path / "gate"
    (tmp_path / "gated.py").write_text(GATED_JUDGE)
    cfg = write_cfg(
        tmp_path,
        **base_cfg(
            tiny_model_path,
            prompt_data_dir,
            out,
            iters=400,
            steps_per_eval=1000,
            judge=f"{tmp_path / 'gated.py'}:judge",
        ),
    )
    first = subprocess.Popen(
        [TRAIN, "--train-mode", "xpo", "--config", cfg],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "GATE": str(gate)},
    )
    try:
        deadline = time.time() + 120
        while not gate.exists() and time.time() < deadline:
            time.sleep(0.05)
        assert gate.exists()
        r = run(["--train-mode", "online_dpo", "--config", cfg], timeout=60)
        assert r.returncode == 2, (r.stdout[-2000:], r.stderr[-2000:])
        errs = [l for l in r.stderr.splitlines() if l.startswith("error:")]
        assert len(errs) == 1 and "Traceback" not in r.stderr, r.stderr
        assert errs[0].startswith(
            f"error: adapter_path: {str(out)!r} is not valid; is in use by another training run (pid {first.pid} on "
        )
        assert "mlx_lm_lora.train --train-mode xpo" in errs[0] and "Loading model" not in r.stdout
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        first.kill()
    assert (out / ".lock").exists()  # the file stays, the lock does not
    again = ["--iters", "1", "--judge", "mlx_xpo_plugin.rules:prefer_letter_e"]
    r = run(["--train-mode", "xpo", "--config", cfg, *again])  # the killed run's files are not overwritten
    assert r.returncode == 2 and "holds a run without a checkpoint" in r.stderr, r.stderr[-3000:]
    r = run(["--train-mode", "xpo", "--config", cfg, *again, "--start-over"])
    assert r.returncode == 0, r.stderr[-3000:]

"""Faults through the real command line: SIGKILL after a periodic checkpoint, a judge whose
endpoint goes away, two runs on one adapter_path."""

import json
import os
import signal
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import mlx.core as mx
import numpy as np

from mlx_xpo_plugin.jsonio import loads_strict
from test_cli_e2e import TRAIN, base_cfg, rows, run, write_cfg


def adapters(path):
    return mx.load(str(path / "adapters.safetensors"))


def test_sigkill_after_a_periodic_checkpoint_then_resume_is_bit_identical_with_a_model_judge(
        tiny_model_path, prompt_data_dir, tmp_path):
    # the judge is a local MLX model (the tiny model: it shuffles pair order with its own RNG)
    kw = dict(iters=12, save_every=1, steps_per_report=1, steps_per_eval=4, val_batches=1,
              judge=tiny_model_path, seed=3)
    full, part = tmp_path / "full", tmp_path / "part"
    (tmp_path / "f").mkdir()
    cfg_full = write_cfg(tmp_path / "f", **base_cfg(tiny_model_path, prompt_data_dir, full, **kw))
    r = run(["--train-mode", "xpo", "--config", cfg_full])
    assert r.returncode == 0, r.stderr[-3000:]

    (tmp_path / "p").mkdir()
    cfg = write_cfg(tmp_path / "p", **base_cfg(tiny_model_path, prompt_data_dir, part, **kw))
    p = subprocess.Popen([TRAIN, "--train-mode", "xpo", "--config", cfg], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
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
    r = run(["--train-mode", "xpo", "--config", cfg, "--resume-adapter-file", str(part)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resume:" not in r.stdout  # the model judge's state was restored, nothing to warn about
    want, got = adapters(full), adapters(part)
    assert sorted(want) == sorted(got)
    assert all(np.array_equal(np.array(want[k]), np.array(got[k])) for k in want)  # bit for bit
    steps = [x["step"] for x in rows(part) if "loss" in x or "judge/pairs" in x]
    assert steps == list(range(1, 13))  # nothing lost, nothing repeated

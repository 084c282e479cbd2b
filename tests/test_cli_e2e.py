"""End to end through the unchanged console script `mlx_lm_lora.train` (stock upstream + activation)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

BIN = Path(sys.executable).parent
TRAIN = str(BIN / "mlx_lm_lora.train")


def write_cfg(tmp_path, **kw):
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(kw))
    return str(p)


def base_cfg(model, data, out, **kw):
    return {
        "model": model,
        "data": data,
        "train": True,
        "adapter_path": str(out),
        "judge": "mlx_xpo_plugin.rules:prefer_letter_e",
        "batch_size": 2,
        "iters": 4,
        "steps_per_report": 2,
        "steps_per_eval": 4,
        "val_batches": 2,
        "save_every": 100,
        "max_seq_length": 256,
        "max_completion_length": 8,
        "learning_rate": 1e-3,
        **kw,
    }


def run(args, env=None, timeout=240):
    e = {**os.environ, **(env or {})}
    return subprocess.run([TRAIN, *args], capture_output=True, text=True, timeout=timeout, env=e)


def rows(out):
    return [json.loads(l) for l in open(Path(out) / "metrics.jsonl")]


def small_data(tmp_path, n_train=4):
    """A prompt folder with `n_train` training prompts (epoch = n_train / batch_size steps)."""
    d = tmp_path / "small_data"
    d.mkdir()
    for split, n in (("train", n_train), ("valid", 4), ("test", 4)):
        (d / f"{split}.jsonl").write_text("".join(json.dumps({"prompt": f"Say {split} {i}!"}) + "\n" for i in range(n)))
    return str(d)


def test_xpo_yaml_only_values_are_used(tiny_model_path, tmp_path):
    out = tmp_path / "ad"
    cfg = write_cfg(
        tmp_path,
        **base_cfg(
            tiny_model_path, small_data(tmp_path), out, alpha=[1e-3, 1e-4], temperature=0.5, max_completion_length=7
        ),
    )
    r = run(["--train-mode", "xpo", "--config", cfg])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "train mode 'xpo' is provided by mlx-xpo-plugin" in r.stderr and "replaces the built-in one" in r.stderr
    import mlx.core  # noqa: F401  (bundled_reference_blas looks next to it)

    from mlx_xpo_plugin.cpu.fast_blas import bundled_reference_blas, choose

    if bundled_reference_blas():  # Linux mlx[cpu]: the run says which BLAS MLX multiplies with, once
        assert "\nBLAS: " in r.stdout and (r.stdout + r.stderr).count("BLAS") == 1
        if choose()[0]:  # an OpenBLAS is installed (the scipy-openblas32 dependency): MLX runs on it
            assert "(preloaded for MLX" in r.stdout and "(slow)" not in r.stdout
    train = [x for x in rows(out) if "loss" in x or "alpha" in x and "val_win_rate" not in x]
    assert [x["alpha"] for x in train] == [1e-3, 1e-4]  # one report per epoch of 2 steps
    assert all(x["temperature"] == 0.5 and x["max_completion_length"] == 7 for x in train)
    assert any("val_win_rate" in x for x in rows(out))
    for line in open(out / "completions.jsonl"):
        rec = json.loads(line)
        assert {"prompt", "completion_a", "completion_b", "winner", "chosen"} <= set(rec)
    assert (out / "adapters.safetensors").is_file() and (out / "adapter_config.json").is_file()
    # the adapters load with plain mlx_lm
    from mlx_lm import load

    load(tiny_model_path, adapter_path=str(out))


def test_cli_flags_beat_yaml_online_dpo(tiny_model_path, prompt_data_dir, tmp_path):
    out = tmp_path / "ad"
    cfg = write_cfg(tmp_path, **base_cfg(tiny_model_path, prompt_data_dir, out, temperature=0.5))
    r = run(["--train-mode", "online_dpo", "--config", cfg, "--temperature", "0.9", "--iters", "2"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "train mode 'online_dpo' is provided by mlx-xpo-plugin" in r.stderr
    train = [x for x in rows(out) if "temperature" in x]
    assert train and all(x["temperature"] == 0.9 and x["alpha"] == 0.0 for x in train)
    assert max(x["step"] for x in rows(out)) == 2


@pytest.mark.parametrize(
    "extra,setting",
    [
        ({"alpah": 1e-4}, "alpah"),
        ({"temperature": "warm"}, "temperature"),
        ({"dpo_cpo_loss_type": "nope"}, "dpo_cpo_loss_type"),
        ({"qat_enable": True}, "qat_enable"),
        ({"judge": "does/not/exist"}, "judge"),
        ({"data": "/nonexistent"}, "data"),
        ({"batch_size": 500}, "batch_size"),
    ],
)
def test_bad_input_is_one_line_exit_2_before_loading(tiny_model_path, prompt_data_dir, tmp_path, extra, setting):
    cfg = write_cfg(tmp_path, **{**base_cfg(tiny_model_path, prompt_data_dir, tmp_path / "ad"), **extra})
    r = run(["--train-mode", "xpo", "--config", cfg], timeout=60)
    assert r.returncode == 2, (r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr + r.stdout
    errs = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(errs) == 1 and setting in errs[0], r.stderr
    assert "Loading model" not in r.stdout  # nothing was loaded


def test_bad_dataset_row_names_file_and_line(tiny_model_path, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text('{"prompt": "ok"}\n{"question": "no prompt"}\n')
    cfg = write_cfg(tmp_path, **base_cfg(tiny_model_path, str(data), tmp_path / "ad"))
    r = run(["--train-mode", "online_dpo", "--config", cfg], timeout=60)
    assert r.returncode == 2 and "train.jsonl:2" in r.stderr and "Traceback" not in r.stderr


def test_sigint_saves_a_checkpoint_and_resume_finishes(tiny_model_path, prompt_data_dir, tmp_path):
    out = tmp_path / "ad"
    cfg = write_cfg(
        tmp_path, **base_cfg(tiny_model_path, prompt_data_dir, out, iters=400, steps_per_report=1, steps_per_eval=1000)
    )
    p = subprocess.Popen(
        [TRAIN, "--train-mode", "xpo", "--config", cfg], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        if (out / "metrics.jsonl").exists() and len(open(out / "metrics.jsonl").readlines()) >= 3:
            break
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 130, stderr[-2000:]
    assert "resume with:" in stdout and "--resume-adapter-file" in stdout
    state = json.load(open(out / "checkpoint" / "state.json"))
    assert 3 <= state["step"] < 400 and not state["final"]
    r = run(
        ["--train-mode", "xpo", "--config", cfg, "--resume-adapter-file", str(out), "--iters", str(state["step"] + 2)]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming from step {state['step']} of {state['step'] + 2}" in r.stdout
    steps = [x["step"] for x in rows(out) if "loss" in x or "judge/pairs" in x]
    assert steps == list(range(1, state["step"] + 3))  # nothing lost, nothing repeated


def test_help_lists_our_settings_with_help_texts():
    r = run(["--help"], timeout=60)
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    from mlx_xpo_plugin.config import PLUGIN_SETTINGS
    from mlx_xpo_plugin.config_views import UPSTREAM_OPTIONS

    for s in PLUGIN_SETTINGS:
        assert s.flag in text, s.flag
        if s.name not in UPSTREAM_OPTIONS:  # upstream's own options keep upstream's help
            assert " ".join(s.help.split())[:30] in text, s.name


def test_checkpoint_of_another_mode_is_refused(tiny_model_path, prompt_data_dir, tmp_path):
    out = tmp_path / "ad"
    cfg = write_cfg(tmp_path, **base_cfg(tiny_model_path, prompt_data_dir, out, iters=1))
    assert run(["--train-mode", "xpo", "--config", cfg]).returncode == 0
    r = run(["--train-mode", "online_dpo", "--config", cfg, "--resume-adapter-file", str(out)])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "train_mode='xpo'" in r.stderr and "train_mode='online_dpo'" in r.stderr
    assert "Loading model" not in r.stdout  # refused before loading anything


BLOCKING_JUDGE = """
import os, time
GATE = os.environ["GATE_DIR"]
def judge(prompt, a, b):
    # while GATE/block exists the judge holds the step (and says so), like a slow human or endpoint
    if os.path.exists(os.path.join(GATE, "block")):
        open(os.path.join(GATE, "blocked"), "w").close()
        while os.path.exists(os.path.join(GATE, "block")):
            time.sleep(0.05)
    return 0
"""


def wait_for(pred, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and not pred():
        time.sleep(0.05)
    assert pred(), "timed out"


def test_second_sigint_exits_at_once_and_keeps_the_last_checkpoint(tiny_model_path, prompt_data_dir, tmp_path):
    out, gate = tmp_path / "ad", tmp_path / "gate"
    gate.mkdir()
    (tmp_path / "blocking_judge.py").write_text(BLOCKING_JUDGE)
    cfg = write_cfg(
        tmp_path,
        **base_cfg(
            tiny_model_path,
            prompt_data_dir,
            out,
            iters=400,
            save_every=2,
            steps_per_report=1,
            steps_per_eval=1000,
            judge=f"{tmp_path / 'blocking_judge.py'}:judge",
        ),
    )
    err_path = tmp_path / "stderr.txt"
    with open(err_path, "w") as err_file:
        p = subprocess.Popen(
            [TRAIN, "--train-mode", "xpo", "--config", cfg],
            stdout=subprocess.DEVNULL,
            stderr=err_file,
            env={**os.environ, "GATE_DIR": str(gate)},
        )
        try:
            wait_for(lambda: (out / "checkpoint" / "state.json").exists())
            (gate / "block").touch()  # the next judge call holds its step open: no race with its end
            wait_for(lambda: (gate / "blocked").exists())
            p.send_signal(signal.SIGINT)
            wait_for(lambda: "finishing this step" in err_path.read_text())
            p.send_signal(signal.SIGINT)  # the step is still held open by the judge
            p.wait(timeout=10)  # "at once": well before the judge would let the step finish
        finally:
            p.kill()
    stderr = err_path.read_text()
    assert p.returncode == 130, stderr[-3000:]
    assert "again: exiting now" in stderr and "Traceback" not in stderr
    assert (gate / "block").exists()  # the step never finished
    state = json.load(open(out / "checkpoint" / "state.json"))  # complete, parseable
    import mlx.core as mx

    for name in ("adapters", "optimizer"):
        _, meta = mx.load(str(out / "checkpoint" / state["files"][name]), return_metadata=True)
        assert meta["step"] == str(state["step"])

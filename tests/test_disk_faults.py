"""A save that fails (disk full, unwritable folder) stops the run with a clear error and leaves the
previous checkpoint complete and resumable; an unwritable adapter_path is refused before loading."""

import errno
import json
import os
import shlex
import shutil
import subprocess

import mlx.core as mx
import numpy as np
from test_cli_e2e import base_cfg, rows, run, small_data, write_cfg

from mlx_xpo_plugin import api
from mlx_xpo_plugin.commands import runner
from mlx_xpo_plugin.loop import atomic as checkpoint
from mlx_xpo_plugin.xpo_trainer import XPO


def settings(model, data, out, **kw):
    return {
        **base_cfg(model, data, out, iters=6, save_every=2, steps_per_report=1, steps_per_eval=100, val_batches=1),
        **kw,
    }


def disk_full_at(monkeypatch, victim: str):
    """Fault-injected writer: the file whose name ends with `victim` gets half its bytes written,
    then ENOSPC (what a full disk does); every other file is written normally."""
    real = checkpoint.atomic_write_bytes

    def writer(path, write):
        if not path.endswith(victim):
            return real(path, write)

        def half_then_full(tmp):
            write(tmp)
            with open(tmp, "r+b") as f:
                f.truncate(os.path.getsize(tmp) // 2)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), tmp)

        return real(path, half_then_full)

    monkeypatch.setattr(checkpoint, "atomic_write_bytes", writer)


def test_disk_full_during_a_save_keeps_the_previous_checkpoint_resumable(
    tiny_model_path, tmp_path, monkeypatch, capsys
):
    data = small_data(tmp_path, n_train=8)
    assert (
        runner.run(api.as_config("xpo", settings(tiny_model_path, data, tmp_path / "full")), XPO, progress=False) == 0
    )
    want = mx.load(str(tmp_path / "full" / "adapters.safetensors"))

    out = tmp_path / "ad"
    cfg = api.as_config("xpo", settings(tiny_model_path, data, out))
    # step 4's adapters are written, then the disk fills up on its optimizer state
    disk_full_at(monkeypatch, "optimizer-0000004.safetensors")
    capsys.readouterr()
    assert runner.run(cfg, XPO, progress=False) == 4
    io = capsys.readouterr()
    errs = [l for l in io.err.splitlines() if l.startswith("error:")]
    assert len(errs) == 1 and "Traceback" not in io.err, io.err
    assert errs[0].startswith("error: saving the checkpoint of step 4 failed: No space left on device")
    assert "the checkpoint of step 2 (" in errs[0] and "is intact" in errs[0]
    (line,) = [x.removeprefix("resume with: ") for x in io.out.splitlines() if x.startswith("resume with: ")]
    assert line.endswith(f" --train-mode xpo --resume-adapter-file {out}"), line
    d = out / "checkpoint"
    state = json.load(open(d / "state.json"))
    assert state["step"] == 2 and sorted(os.listdir(d)) == sorted(["state.json", *state["files"].values()])

    monkeypatch.undo()  # space again: the resumed run reaches the uninterrupted run's adapters
    shutil.copytree(out, tmp_path / "copy")
    r = subprocess.run(shlex.split(line), capture_output=True, text=True, timeout=300)  # exactly as printed
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from step 2 of 6" in r.stdout and json.load(open(d / "state.json"))["step"] == 6
    assert [x["step"] for x in rows(out) if "judge/pairs" in x] == [1, 2, 3, 4, 5, 6]
    # (its numbers are another process's: BLAS threads follow the machine's load, so no bit-for-bit here)
    # the Python API: the folder alone resumes it too (its settings are the checkpoint's), bit for bit
    assert runner.run(api.as_config("xpo", {"resume_adapter_file": str(tmp_path / "copy")}), XPO, progress=False) == 0
    got = mx.load(str(tmp_path / "copy" / "adapters.safetensors"))
    assert all(np.array_equal(np.array(want[k]), np.array(got[k])) for k in want)


def test_disk_full_on_the_metrics_log_is_a_clear_error(tiny_model_path, tmp_path, monkeypatch, capsys):
    from mlx_xpo_plugin.loop import metrics

    data = small_data(tmp_path, n_train=8)
    out = tmp_path / "ad"
    real_open = open

    def full_open(path, mode="r", *a, **k):
        if str(path).endswith("metrics.jsonl") and "a" in mode and os.path.exists(out / "checkpoint"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr(metrics, "open", full_open, raising=False)
    assert runner.run(api.as_config("xpo", settings(tiny_model_path, data, out)), XPO, progress=False) == 4
    err = capsys.readouterr().err
    assert "error: writing " in err and "metrics.jsonl failed: No space left on device" in err
    assert "the checkpoint of step 2 (" in err and "Traceback" not in err


def test_an_unwritable_adapter_path_is_refused_before_loading(tiny_model_path, tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    out = tmp_path / "a_file" / "ad"
    cfg = write_cfg(tmp_path, **base_cfg(tiny_model_path, small_data(tmp_path), out))
    r = run(["--train-mode", "xpo", "--config", cfg], timeout=60)
    assert r.returncode == 2, (r.stdout[-2000:], r.stderr[-2000:])
    errs = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(errs) == 1 and errs[0].startswith(f"error: adapter_path: {str(out)!r} is not valid"), r.stderr
    assert "cannot write there" in errs[0] and "Loading model" not in r.stdout

"""Data parallel with MLX's own launcher (ring backend on loopback)."""

import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

WORKER = str(Path(__file__).with_name("dist_worker.py"))
LAUNCH = shutil.which("mlx.launch") or str(Path(sys.executable).with_name("mlx.launch"))


def test_two_processes_equal_one_process_with_the_same_global_batch(tiny_model_path, prompt_data_dir, tmp_path):
    one, two = str(tmp_path / "one.safetensors"), str(tmp_path / "two.safetensors")
    r1 = subprocess.run(
        [sys.executable, WORKER, tiny_model_path, prompt_data_dir, one, "4"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r1.returncode == 0, r1.stderr[-2000:]
    r2 = subprocess.run(
        [LAUNCH, "-n", "2", "--backend", "ring", sys.executable, WORKER, tiny_model_path, prompt_data_dir, two, "2"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r2.returncode == 0, (r2.stdout[-2000:], r2.stderr[-2000:])
    a, b = mx.load(one), mx.load(two)
    assert set(a) == set(b)
    diff = max(float(np.abs(np.array(a[k]) - np.array(b[k])).max()) for k in a)
    moved = max(float(np.abs(np.array(a[k])).max()) for k in a if "lora_b" in k)
    assert moved > 1e-4 and diff < 1e-5, (moved, diff)

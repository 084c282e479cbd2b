"""Data parallel on hosts that share no disk, tried as two machines are: under ``mlx.launch``
(ring, loopback), each process in its own mount namespace with its own private folder bound at
the run's path (``<tmp>/host``), so that a file one process writes there is not seen by the other.
Needs root (or a user namespace) for ``unshare --mount`` and ``mount --bind``; skipped otherwise."""

import os
import subprocess

import mlx.core as mx
import numpy as np
import pytest
from test_cli_e2e import TRAIN, base_cfg, small_data, write_cfg
from test_distributed import LAUNCH

# each process: its own mount namespace, $NODISK_ROOT/disk-<rank> bound over $NODISK_ROOT/host
PRIVATE = 'mount --bind "$NODISK_ROOT/disk-$MLX_RANK" "$NODISK_ROOT/host" && exec "$@"'


def _unshare_works(tmp) -> str:
    """'' when a process may bind a folder in a mount namespace of its own; else why not."""
    a, b = tmp / "probe-a", tmp / "probe-b"
    a.mkdir(), b.mkdir()
    try:
        r = subprocess.run(
            ["unshare", "--mount", "sh", "-c", f'mount --bind "{a}" "{b}" && test -d "{b}"'],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except OSError as e:
        return f"unshare is not available ({e})"
    return "" if r.returncode == 0 else f"unshare --mount + mount --bind is not permitted here: {r.stderr.strip()}"


@pytest.fixture
def hosts(tmp_path):
    """(root, env): <root>/disk-0 and disk-1 are the two hosts' disks, <root>/host the run's folder."""
    why = _unshare_works(tmp_path)
    if why:
        pytest.skip(why)
    for d in ("disk-0", "disk-1", "host"):
        (tmp_path / d).mkdir()
    return tmp_path, {**os.environ, "NODISK_ROOT": str(tmp_path)}


def launch(args, env, private: bool, timeout=300):
    wrap = ["unshare", "--mount", "sh", "-c", PRIVATE, "sh"] if private else []
    cmd = [LAUNCH, "-n", "2", "--backend", "ring", *wrap, TRAIN, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def files_under(d) -> list:
    return sorted(os.path.relpath(os.path.join(p, f), d) for p, _, fs in os.walk(d) for f in fs)


def run_and_resume(tmp_path, model, data, out, env, private: bool):
    cfg = write_cfg(tmp_path, **base_cfg(model, data, out, iters=2, save_every=1, steps_per_eval=100))
    first = launch(["--train-mode", "xpo", "--config", cfg], env, private)
    assert "exited with code" not in first.stderr, first.stderr[-3000:]  # mlx.launch itself says 0 regardless
    resume = ["--train-mode", "xpo", "--config", cfg, "--resume-adapter-file", str(out), "--iters", "4"]
    again = launch(resume, env, private)
    assert "exited with code" not in again.stderr, again.stderr[-3000:]
    assert "resuming from step 2 of 4" in again.stdout, again.stdout[-2000:]
    return again


def test_run_and_resume_without_a_shared_disk_equal_the_shared_disk_run(tiny_model_path, hosts):
    root, env = hosts
    data = small_data(root, 8)
    run_and_resume(root, tiny_model_path, data, root / "shared" / "ad", env, private=False)
    run_and_resume(root, tiny_model_path, data, root / "host" / "ad", env, private=True)
    assert files_under(root / "disk-1") == []  # process 1 wrote nothing
    assert "ad/checkpoint/state.json" in files_under(root / "disk-0")
    assert files_under(root / "host") == []  # the mount point itself: nothing written past the mounts
    a = mx.load(str(root / "shared" / "ad" / "adapters.safetensors"))
    b = mx.load(str(root / "disk-0" / "ad" / "adapters.safetensors"))
    assert set(a) == set(b)
    assert all(np.array_equal(np.array(a[k]), np.array(b[k])) for k in a)
    assert max(float(np.abs(np.array(a[k])).max()) for k in a if "lora_b" in k) > 0  # trained


def test_a_refused_resume_is_one_line_from_process_0_and_every_process_exits_2(tiny_model_path, hosts):
    root, env = hosts
    out = root / "host" / "ad"
    data = small_data(root, 8)
    cfg = write_cfg(root, **base_cfg(tiny_model_path, data, out, iters=1, steps_per_eval=100))
    assert launch(["--train-mode", "xpo", "--config", cfg], env, private=True).returncode == 0
    r = ["--train-mode", "xpo", "--config", cfg, "--resume-adapter-file", str(out), "--batch-size", "1"]
    r = launch(r, env, private=True)
    lines = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, r.stderr[-3000:]
    assert lines[0].startswith(
        f"error: resume_adapter_file: {str(out)!r} is not valid; the checkpoint was made with batch_size=2, "
        "this run has batch_size=1"
    ), lines
    assert "Node with rank 0 exited with code 2" in r.stderr and "Node with rank 1 exited with code 2" in r.stderr
    assert files_under(root / "disk-1") == []


def test_a_setting_only_process_1_refuses_reaches_process_0s_line(tiny_model_path, hosts):
    """Process 1's host lacks the data folder: both processes refuse, process 0 says why."""
    root, env = hosts
    os.makedirs(root / "disk-0" / "data")
    data = small_data(root / "disk-0" / "data", 8)  # on host 0 only
    cfg = write_cfg(root, **base_cfg(tiny_model_path, data.replace("disk-0", "host"), root / "host" / "ad"))
    r = launch(["--train-mode", "xpo", "--config", cfg], env, private=True)
    lines = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith("error: process 1 of 2 refused to start: data: "), r.stderr[-3000:]
    assert "expected a local folder with train.jsonl" in lines[0]
    assert "Node with rank 0 exited with code 2" in r.stderr and "Node with rank 1 exited with code 2" in r.stderr
    assert files_under(root / "disk-1") == [] and "ad" not in os.listdir(root / "disk-0")


FAILS_ON_PROCESS_1 = """
import mlx.core as mx

calls = 0

def judge(prompt, a, b):
    global calls
    calls += 1
    if mx.distributed.init().rank() == 1 and calls > 2:  # its first step's 2 pairs, then it raises
        raise ValueError("the judge's service is down on host 1")
    return 0 if a.count("e") >= b.count("e") else 1
"""


def test_the_judge_failing_on_process_1_is_named_on_process_0s_line(tiny_model_path, hosts):
    root, env = hosts
    (root / "judge1.py").write_text(FAILS_ON_PROCESS_1)
    kw = dict(judge=f"{root / 'judge1.py'}:judge", iters=2, steps_per_eval=100)
    cfg = write_cfg(root, **base_cfg(tiny_model_path, small_data(root, 8), root / "host" / "ad", **kw))
    r = launch(["--train-mode", "xpo", "--config", cfg], env, private=True)
    assert "exited with code" not in r.stderr, r.stderr[-3000:]
    assert (
        "step 2: the judge failed on 2 of 4 pairs (2 errors: ValueError: the judge's service is down on host 1 "
        "(on process 1 of 2))"
    ) in r.stdout, r.stdout[-2000:]
    assert files_under(root / "disk-1") == []

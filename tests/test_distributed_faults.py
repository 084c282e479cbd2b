"""Data parallel faults under MLX's own launcher (ring backend on loopback): a lost process, a
process that stops with an error of its own, and stops that begin on one process (process 0's
validation judge, its failed save, a signal to process 1) ending every process at the same point."""

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time

from test_cli_e2e import TRAIN, base_cfg, rows, small_data, write_cfg
from test_distributed import LAUNCH

from mlx_xpo_plugin.commands.hints import command
from mlx_xpo_plugin.commands.peers import peer_errors, peer_run
from mlx_xpo_plugin.exits import Exit
from mlx_xpo_plugin.loop.faults import JudgeFailure
from mlx_xpo_plugin.loop.share import Elsewhere

SLOW_JUDGE = """
import os, time
import mlx.core as mx

def judge(prompt, a, b):
    rank = mx.distributed.init().rank()
    path = os.path.join(os.environ["PIDS"], f"pid-{rank}")
    with open(path + ".partial", "w") as f:  # whole or not there: the test reads it at any time
        f.write(str(os.getpid()))
    os.replace(path + ".partial", path)
    time.sleep(0.05)
    return 0 if a.count("e") >= b.count("e") else 1
"""


def checkpoint_step(out):
    try:
        return json.load(open(out / "checkpoint" / "state.json"))["step"]
    except (OSError, ValueError, KeyError):
        return 0


def launch_slow_run(tiny_model_path, tmp_path, iters: int, **kw):
    """Two processes under mlx.launch with SLOW_JUDGE (each writes its pid to ``pids``), a checkpoint
    every step. Returns (the launcher's Popen, adapter_path, pids folder, command, environment)."""
    out, pids = tmp_path / "ad", tmp_path / "pids"
    pids.mkdir()
    (tmp_path / "slow.py").write_text(SLOW_JUDGE)
    kw = dict(judge=f"{tmp_path / 'slow.py'}:judge", iters=iters, save_every=1, steps_per_report=1, **kw)
    cfg = write_cfg(tmp_path, **base_cfg(tiny_model_path, small_data(tmp_path, 4 * iters), out, **kw))
    cmd = [LAUNCH, "-n", "2", "--backend", "ring", TRAIN, "--train-mode", "xpo", "--config", cfg]
    env = {**os.environ, "PIDS": str(pids)}
    p = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    return p, out, pids, cmd, env


def end_launch(p) -> None:
    """The launcher and every process it started (a failed test leaves none running)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, signal.SIGKILL)
    p.wait()


def signal_process_1_after(p, out, pids, step: int, sig) -> None:
    """``sig`` to process 1 once process 0 has saved the checkpoint of ``step``."""
    deadline = time.time() + 120
    while checkpoint_step(out) < step and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    assert checkpoint_step(out) >= step, p.communicate()[1][-3000:]
    os.kill(int((pids / "pid-1").read_text()), sig)


def test_sigkill_of_one_process_stops_the_other_with_one_line_and_resume_reaches_the_end(tiny_model_path, tmp_path):
    p, out, pids, cmd, env = launch_slow_run(tiny_model_path, tmp_path, 24, val_batches=1)
    try:
        signal_process_1_after(p, out, pids, 3, signal.SIGKILL)
        t0 = time.time()
        stdout, stderr = p.communicate(timeout=60)  # the survivor ends within 60 s
        took = time.time() - t0
    finally:
        end_launch(p)
    assert took < 60
    lines = [x for x in stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    step = checkpoint_step(out)
    assert f"error: process 1 of 2 was lost during step {step + 1} (" in lines[0], lines[0]
    assert f"the checkpoint of step {step} ({out / 'checkpoint'}) is intact: resume with: " in lines[0]
    line = lines[0].split("resume with: ", 1)[1]  # launched as this run was: mlx.launch, its options, the program
    want = [command("mlx.launch"), *cmd[1:6], "--train-mode", "xpo", "--resume-adapter-file", str(out)]
    assert line == shlex.join(want), line
    assert "Node with rank 0 exited with code 5" in stderr  # Exit.PEER; mlx.launch itself says 0
    assert step < 24

    (out / "training.png").write_bytes(b"a plot of the earlier part")  # moved aside once, by process 0
    r = subprocess.run(
        shlex.split(line),  # exactly as printed
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert checkpoint_step(out) == 24 and "Traceback" not in r.stderr
    (kept,) = [p for p in out.iterdir() if p.name.startswith("training.") and p.name != "training.png"]
    assert kept.read_bytes() == b"a plot of the earlier part" and r.stdout.count(f"training.png -> {kept.name}") == 1
    assert [x["step"] for x in rows(out) if "judge/pairs" in x] == list(range(1, 25))


def test_a_process_stopping_with_its_own_error_is_reported_once_by_process_0(tmp_path, capsys):
    def fails():
        raise JudgeFailure("the judge 'j' raised ValueError: bad at step 3")

    assert peer_run(type("C", (), {"adapter_path": str(tmp_path)}), 1, fails) == Exit.JUDGE
    assert capsys.readouterr().err == ""  # process 1 says nothing itself
    assert peer_errors(str(tmp_path), wait=0) == ["process 1 stopped: the judge 'j' raised ValueError: bad at step 3"]
    assert os.listdir(tmp_path) == []  # read once

    def stops(status=Exit.JUDGE):
        import sys

        print("error: the judge 'j' failed on every pair of step 1", file=sys.stderr)
        return status

    # a run that ends with a status stopped together with process 0, which says why: no file
    assert peer_run(type("C", (), {"adapter_path": str(tmp_path)}), 1, stops) == Exit.JUDGE
    assert capsys.readouterr().err == "" and os.listdir(tmp_path) == []

    def refused():
        raise Elsewhere(Exit.BAD_INPUT)  # process 0 refused to start, or its read failed

    assert peer_run(type("C", (), {"adapter_path": str(tmp_path)}), 1, refused) == Exit.BAD_INPUT
    assert capsys.readouterr().err == "" and os.listdir(tmp_path) == []


LAUNCHER_STOPS_THE_SURVIVOR = r"""
import os, signal, sys, time
from types import SimpleNamespace
from mlx_xpo_plugin.loop.faults import PeerLost
from mlx_xpo_plugin.loop.run_loop import GracefulStop

trainer = SimpleNamespace(rank=0, stop_requests=0)
try:
    with GracefulStop(trainer):
        raise PeerLost(3, 0, 2, RuntimeError("[ring] Recv failed with errno=104"))
except PeerLost as e:
    os.kill(os.getpid(), signal.SIGTERM)  # mlx.launch terminates the others once one process failed
    time.sleep(float(sys.argv[1]))  # process 0 waits for the peers' messages meanwhile (commands/peers.py)
    print(f"error: {e}", flush=True)
"""


def test_a_process_that_lost_a_peer_says_so_although_the_launcher_terminates_it():
    """mlx.launch sends SIGTERM to the survivors as soon as one process has failed: a survivor
    already stopping must still print its one line (it was killed by the default handler)."""
    import sys

    r = subprocess.run(
        [sys.executable, "-c", LAUNCHER_STOPS_THE_SURVIVOR, "0.5"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert r.stdout.strip() == "error: process 1 of 2 was lost during step 3 ([ring] Recv failed with errno=104)"


def test_a_survivor_that_hangs_after_the_launchers_sigterm_still_ends():
    """The grace is bounded: a process that does not end within GRACE_S of the SIGTERM is ended."""
    from mlx_xpo_plugin.loop.run_loop import GRACE_S

    t0 = time.time()
    r = subprocess.run(
        [sys.executable, "-c", LAUNCHER_STOPS_THE_SURVIVOR, str(GRACE_S + 30)], capture_output=True, text=True,
        timeout=GRACE_S + 60,
    )  # fmt: skip
    assert r.returncode != 0 and r.stdout == "" and time.time() - t0 < GRACE_S + 20


VALIDATION_FAILS_ON_PROCESS_0 = """
import mlx.core as mx
from mlx_xpo_plugin.loop import faults

real, validations = faults.GuardedJudge.judge, []

def down_in_validation(self, prompts, pairs):  # a whole call that raises, as a Judge object's can
    validations.extend(p for p in prompts if "valid" in p)
    if len(validations) > 2:  # the baseline's 2 prompts are judged, the next validation's not
        raise faults.JudgeFailure("the judge 'vjudge' raised ConnectionError: the validation judge is down")
    return real(self, prompts, pairs)

if mx.distributed.init().rank() == 0:  # process 0 validates alone
    faults.GuardedJudge.judge = down_in_validation

def judge(prompt, a, b):
    return 0 if a.count("e") >= b.count("e") else 1
"""


def test_a_judge_failing_in_process_0s_validation_stops_every_process_with_its_line(tiny_model_path, tmp_path):
    """Validation runs on process 0 only: its judge's failure there stops the other process too,
    instead of leaving it in the next step's first sum until process 0 has gone (a lost peer)."""
    out = tmp_path / "ad"
    (tmp_path / "vjudge.py").write_text(VALIDATION_FAILS_ON_PROCESS_0)
    kw = dict(judge=f"{tmp_path / 'vjudge.py'}:judge", iters=4, steps_per_eval=2, val_batches=1, steps_per_report=1)
    cfg = write_cfg(tmp_path, **base_cfg(tiny_model_path, small_data(tmp_path, 16), out, **kw))
    cmd = [LAUNCH, "-n", "2", "--backend", "ring", TRAIN, "--train-mode", "xpo", "--config", cfg]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    for rank in (0, 1):  # mlx.launch itself exits 0 regardless
        assert f"Node with rank {rank} exited with code {int(Exit.JUDGE)}" in r.stderr, r.stderr[-3000:]
    assert (
        "stopped at step 2 of 4: the judge 'vjudge' raised ConnectionError: the validation judge is down during the "
        "validation of step 2; checkpoint of step 2 saved."
    ) in r.stdout, r.stdout[-2000:]
    assert "error:" not in r.stderr and "was lost" not in r.stdout + r.stderr and "Traceback" not in r.stderr
    assert [x["step"] for x in rows(out) if "judge/pairs" in x] == [1, 2]  # no process went on to step 3
    assert json.load(open(out / "checkpoint" / "state.json"))["step"] == 2


DISK_FULL_ON_PROCESS_0 = """
import errno, os
import mlx.core as mx
from mlx_xpo_plugin.loop import atomic

real = atomic.atomic_write_bytes

def full_at_step_2(path, write):  # process 0's disk fills up on step 2's optimizer state
    if path.endswith("optimizer-0000002.safetensors"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    return real(path, write)

if mx.distributed.init().rank() == 0:
    atomic.atomic_write_bytes = full_at_step_2

def judge(prompt, a, b):
    return 0 if a.count("e") >= b.count("e") else 1
"""


def test_a_save_failing_on_process_0_ends_every_process_with_one_line(tiny_model_path, tmp_path):
    """Only process 0 saves: its failed save ends the others too, with its status, instead of
    leaving them in the next step's first sum to report process 0 as lost (a second line)."""
    out = tmp_path / "ad"
    (tmp_path / "full.py").write_text(DISK_FULL_ON_PROCESS_0)
    kw = dict(judge=f"{tmp_path / 'full.py'}:judge", iters=4, save_every=2, steps_per_report=1)
    cfg = write_cfg(tmp_path, **base_cfg(tiny_model_path, small_data(tmp_path, 16), out, **kw))
    cmd = [LAUNCH, "-n", "2", "--backend", "ring", TRAIN, "--train-mode", "xpo", "--config", cfg]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    for rank in (0, 1):  # mlx.launch itself exits 0 regardless
        assert f"Node with rank {rank} exited with code {int(Exit.SAVE)}" in r.stderr, r.stderr[-3000:]
    assert len(errors) == 1 and "saving the checkpoint of step 2 failed" in errors[0], errors
    assert "was lost" not in r.stderr + r.stdout and "Traceback" not in r.stderr
    assert [x["step"] for x in rows(out) if "judge/pairs" in x] == [1, 2]  # no process went on to step 3


def test_sigterm_to_one_process_stops_every_process_after_the_same_step(tiny_model_path, tmp_path):
    """A signal that reaches one machine's process only (a scheduler preempting one host): every
    process finishes the same step and stops as interrupted, process 0 saving that step, instead of
    process 0 going on and finding its peer lost; the printed resume line then reaches the end."""
    p, out, pids, _, env = launch_slow_run(tiny_model_path, tmp_path, 12, steps_per_eval=100)
    try:
        signal_process_1_after(p, out, pids, 2, signal.SIGTERM)
        stdout, stderr = p.communicate(timeout=120)
    finally:
        end_launch(p)
    step = checkpoint_step(out)
    for rank in (0, 1):  # mlx.launch itself exits 0 regardless
        assert f"Node with rank {rank} exited with code {int(Exit.INTERRUPTED)}" in stderr, stderr[-3000:]
    assert f"stopped at step {step} of 12: interrupted; checkpoint of step {step} saved." in stdout, stdout[-2000:]
    assert "error:" not in stderr and "was lost" not in stdout + stderr and "Traceback" not in stderr
    assert 2 <= step < 12 and [x["step"] for x in rows(out) if "judge/pairs" in x] == list(range(1, step + 1))
    (line,) = [x.split("resume with: ", 1)[1] for x in stdout.splitlines() if x.startswith("resume with: ")]
    r = subprocess.run(shlex.split(line), capture_output=True, text=True, timeout=300, env=env)  # exactly as printed
    assert r.returncode == 0 and "exited with code" not in r.stderr, r.stderr[-3000:]
    assert [x["step"] for x in rows(out) if "judge/pairs" in x] == list(range(1, 13))

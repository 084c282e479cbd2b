"""loop/share.py: what process 0 reads reaches every process bit for bit, a failure of process 0's
read stops every process with its status, and a step's failure on one process is raised on all
(two processes under mlx.launch, ring on the loopback); with one process each is a plain call."""

import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from test_distributed import LAUNCH

from mlx_xpo_plugin.errors import ConfigError
from mlx_xpo_plugin.loop import share

SCRIPT = r"""
import json, sys
import mlx.core as mx
import numpy as np
from mlx_xpo_plugin.errors import ConfigError
from mlx_xpo_plugin.loop import share
from mlx_xpo_plugin.loop.faults import JudgeFailure

rank, out = mx.distributed.init().rank(), {}
seen = []
out["value"] = share.from_rank0(lambda: seen.append(rank) or {"step": 3, "settings": {"beta": 0.1}})
out["read_on"] = seen

def refuse():
    raise ConfigError("resume_adapter_file", "x", "no checkpoint found there")

try:
    share.from_rank0(refuse)
except ConfigError as e:
    out["refused"] = ["ConfigError", str(e)]
except share.Elsewhere as e:
    out["refused"] = ["Elsewhere", e.exit_status]

def arrays():
    return {
        "bf16": mx.array([-0.0, 1.5, float("nan"), -3e-5], dtype=mx.bfloat16),
        "f32": mx.array(np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32)) * -1,
        "scalar": mx.array(7, dtype=mx.uint32),
        "empty": mx.zeros((0, 4)),
    }

got = share.arrays_from_rank0(arrays)
want = arrays()
out["arrays"] = {
    k: [list(got[k].shape), str(got[k].dtype), np.array(mx.view(got[k].reshape(-1), mx.uint8)).tobytes()
        == np.array(mx.view(want[k].reshape(-1), mx.uint8)).tobytes()]
    for k in want
}
out["gather"] = share.gather({"rank": rank} if rank else None)
out["first_said"] = share.first_said("ValueError: down" if rank == 1 else None)
try:
    share.stop_together(JudgeFailure("the judge 'j' raised ValueError: down") if rank == 1 else None)
except JudgeFailure as e:
    out["stop"] = str(e)
with open(sys.argv[1] + f".{rank}", "w") as f:
    json.dump(out, f)
"""


def test_two_processes_receive_what_process_0_read(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run(
        [LAUNCH, "-n", "2", "--backend", "ring", sys.executable, "-c", SCRIPT, str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "exited with code" not in r.stderr, r.stderr[-3000:]
    got = [json.loads((tmp_path / f"out.{rank}").read_text()) for rank in (0, 1)]
    for rank, g in enumerate(got):
        assert g["value"] == {"step": 3, "settings": {"beta": 0.1}}
        assert g["read_on"] == ([0] if rank == 0 else [])  # read() runs on process 0 only
        assert g["arrays"] == {
            "bf16": [[4], "mlx.core.bfloat16", True],  # -0.0 and NaN bit for bit
            "f32": [[3, 5], "mlx.core.float32", True],
            "scalar": [[], "mlx.core.uint32", True],
            "empty": [[0, 4], "mlx.core.float32", True],
        }
        assert g["gather"] == [None, {"rank": 1}]
        assert g["first_said"] == "ValueError: down (on process 1 of 2)"
        assert g["stop"] == "the judge 'j' raised ValueError: down (on process 1 of 2)"
    assert got[0]["refused"] == ["ConfigError", "resume_adapter_file: 'x' is not valid; no checkpoint found there"]
    assert got[1]["refused"] == ["Elsewhere", 2]  # process 0's status; process 0 says why


def test_one_process_calls_read_directly():
    assert share.from_rank0(lambda: {"a": 1}) == {"a": 1}
    a = {"w": mx.array([1.0, -0.0])}
    assert share.arrays_from_rank0(lambda: a) is a
    assert share.gather(5) == [5] and share.first_said("x") == "x" and share.first_said(None) is None
    with pytest.raises(ConfigError):
        share.from_rank0(lambda: (_ for _ in ()).throw(ConfigError("s", 1, "bad")))
    share.wait_for_process_0()  # returns at once
    assert np.array_equal(np.array(a["w"]), [1.0, 0.0])

"""Every JSON file the project writes is strict JSON (RFC 8259): no NaN / Infinity, null instead."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from test_cli_e2e import base_cfg, run, small_data, write_cfg

from mlx_xpo_plugin.loop.atomic import save_json
from mlx_xpo_plugin.loop.jsonio import dumps, loads_strict
from mlx_xpo_plugin.loop.metrics import JsonlLog


def test_strict_reader_rejects_what_python_writes_by_default():
    with pytest.raises(ValueError, match="NaN"):
        loads_strict(json.dumps({"x": float("nan")}))
    assert loads_strict(
        dumps(
            {
                "x": float("nan"),
                "y": [float("inf"), -float("inf"), 1.5],
                "z": np.float32("nan"),
                "w": np.int64(3),
                "v": (1, 2),
            }
        )
    ) == {"x": None, "y": [None, None, 1.5], "z": None, "w": 3, "v": [1, 2]}


def test_jsonl_log_and_save_json_write_null_for_undefined_numbers(tmp_path):
    log = JsonlLog(str(tmp_path / "m.jsonl"))
    log.write({"step": 1, "val_win_rate": float("nan"), "loss": 0.25})
    assert loads_strict((tmp_path / "m.jsonl").read_text()) == {"step": 1, "val_win_rate": None, "loss": 0.25}
    save_json(str(tmp_path / "t.json"), {"win_rate": float("nan"), "ci": [math.inf, 0.5]})
    assert loads_strict((tmp_path / "t.json").read_text()) == {"win_rate": None, "ci": [None, 0.5]}


# a tie on every validation and test prompt (the win-rate is undefined); training prompts are
# decided, since a run without a single update is a failure (exit 3)
TIE_JUDGE = "def judge(prompt, a, b):\n    return 0 if 'train' in prompt else None\n"


def test_a_run_with_undefined_win_rates_writes_only_strict_json(tiny_model_path, tmp_path):
    (tmp_path / "tie_judge.py").write_text(TIE_JUDGE)
    out = tmp_path / "ad"
    cfg = write_cfg(
        tmp_path,
        **base_cfg(
            tiny_model_path,
            small_data(tmp_path),
            out,
            iters=2,
            steps_per_report=1,
            steps_per_eval=1,
            test=True,
            test_batches=1,
            judge=f"{tmp_path / 'tie_judge.py'}:judge",
        ),
    )
    r = run(["--train-mode", "online_dpo", "--config", cfg])
    assert r.returncode == 0, r.stderr[-3000:]
    files = sorted(p for p in Path(out).rglob("*") if p.suffix in (".json", ".jsonl"))
    names = {p.name for p in files}
    assert {"metrics.jsonl", "completions.jsonl", "state.json", "adapter_config.json", "test_metrics.json"} <= names, (
        names
    )
    for p in files:
        lines = p.read_text().splitlines() if p.suffix == ".jsonl" else [p.read_text()]
        for line in lines:
            loads_strict(line)  # raises on NaN / Infinity
    vals = [loads_strict(l) for l in open(out / "metrics.jsonl") if "val_win_rate" in l]
    assert vals and all(v["val_win_rate"] is None and v["val_ties"] > 0 for v in vals)
    assert loads_strict((out / "test_metrics.json").read_text())["win_rate"] is None
    said = [line for line in r.stdout.splitlines() if "validation win-rate" in line]  # what the user reads
    assert len(said) == 3 and all("no decided pair" in line and "nan" not in line for line in said), said

"""The example third-party plugin in examples/my_judge_plugin, loaded through its entry point."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "my_judge_plugin"
TRAIN = str(Path(sys.executable).with_name("mlx_lm_lora.train"))


def installed_like(tmp_path) -> str:
    """The plugin as an installed distribution: the module plus a *.dist-info with its entry point."""
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(EXAMPLE / "my_judge_plugin.py", site)
    dist = site / "my_judge_plugin-0.1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-judge-plugin\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text("[mlx_lm_lora]\nmy_judge_plugin = my_judge_plugin\n")
    return str(site)


def run(args, site):
    env = {**os.environ, "PYTHONPATH": site}
    return subprocess.run([TRAIN, *args], capture_output=True, text=True, env=env, timeout=240)


def test_third_party_judge_trains_online_dpo(tiny_model_path, prompt_data_dir, tmp_path):
    site = installed_like(tmp_path)
    out = tmp_path / "ad"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model": tiny_model_path,
                "data": prompt_data_dir,
                "train": True,
                "adapter_path": str(out),
                "judge": "shortest",
                "judge_config": {"min_chars": 1},
                "iters": 2,
                "batch_size": 2,
                "max_completion_length": 8,
                "max_seq_length": 128,
                "steps_per_report": 1,
            }
        )
    )
    r = run(["--train-mode", "online_dpo", "--config", str(cfg)], site)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(l) for l in open(out / "metrics.jsonl") if "judge/pairs" in l]
    assert sum(x["judge/pairs"] for x in rows) == 4
    for line in open(out / "completions.jsonl"):
        rec = json.loads(line)
        if rec["winner"] is not None:
            shorter = "a" if len(rec["completion_a"]) < len(rec["completion_b"]) else "b"
            assert rec["chosen"] == shorter


def test_third_party_judge_config_is_validated_before_loading(tiny_model_path, prompt_data_dir, tmp_path):
    site = installed_like(tmp_path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model": tiny_model_path,
                "data": prompt_data_dir,
                "train": True,
                "judge": "shortest",
                "judge_config": {"max_chars": 3},
                "max_completion_length": 8,
                "max_seq_length": 128,
            }
        )
    )
    r = run(["--train-mode", "xpo", "--config", str(cfg)], site)
    assert r.returncode == 2 and "judge_config.max_chars" in r.stderr and "Traceback" not in r.stderr


def test_third_party_train_mode_runs(prompt_data_dir, tmp_path):
    site = installed_like(tmp_path)
    r = run(["--train-mode", "count_prompts", "--data", prompt_data_dir, "--adapter-path", str(tmp_path / "o")], site)
    assert r.returncode == 0, r.stderr[-2000:]
    n = sum(1 for _ in open(os.path.join(prompt_data_dir, "train.jsonl")))
    assert json.load(open(tmp_path / "o" / "count.json")) == {"train_prompts": n}
    assert "count_prompts: my-judge-plugin 0.1.0" in r.stdout

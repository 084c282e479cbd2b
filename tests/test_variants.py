"""LoRA, DoRA, full fine-tuning and a quantized base, through the Python API."""

import json
import os

import pytest

from mlx_xpo_plugin.errors import ConfigError
from mlx_xpo_plugin.online_dpo_trainer import train_online_dpo
from mlx_xpo_plugin.xpo_trainer import train_xpo


def cfg(model, data, out, **kw):
    return {
        "model": model,
        "data": data,
        "adapter_path": str(out),
        "iters": 2,
        "batch_size": 2,
        "judge": "mlx_xpo_plugin.rules:prefer_letter_e",
        "max_completion_length": 8,
        "max_seq_length": 128,
        "steps_per_report": 1,
        "steps_per_eval": 100,
        "learning_rate": 1e-3,
        **kw,
    }


@pytest.mark.parametrize(
    "kw",
    [
        {"train_type": "dora"},
        {"train_type": "full"},
        {"train_type": "lora", "load_in_4bits": True},
        {"train_type": "lora", "load_in_8bits": True, "xpo_bonus": "paper"},
    ],
)
def test_variants_train_and_write_adapters(tiny_model_path, prompt_data_dir, tmp_path, kw, capsys, monkeypatch):
    monkeypatch.setenv("MLX_XPO_VERBOSE", "1")  # the reference line is a detail line
    out = tmp_path / "ad"
    assert train_xpo(cfg(tiny_model_path, prompt_data_dir, out, **kw), progress=False) == 0
    rows = [json.loads(l) for l in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows if "judge/pairs" in r] == [1, 2]
    assert os.path.getsize(out / "adapters.safetensors") > 0
    text = capsys.readouterr().out
    if kw["train_type"] == "full":
        assert "reference: frozen model" in text
    else:
        assert "adapters switched off" in text


def test_full_finetune_of_quantized_base_is_refused(tiny_model_path, prompt_data_dir, tmp_path):
    with pytest.raises(ConfigError, match="train_type: 'full'.*quantized"):
        train_online_dpo(
            cfg(tiny_model_path, prompt_data_dir, tmp_path / "ad", train_type="full", load_in_4bits=True),
            progress=False,
        )

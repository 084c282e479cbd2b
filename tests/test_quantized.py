"""A quantized model folder is recognised as such (from its config and from the loaded model):
train_type full is refused with the reason, LoRA/DoRA on it train."""

import json

import mlx.core as mx
import pytest
from test_cli_e2e import base_cfg, run, small_data, write_cfg


@pytest.fixture(scope="module")
def q4_model(tiny_model_path, tmp_path_factory):
    from mlx_lm import convert

    out = tmp_path_factory.mktemp("q") / "tiny-4bit"
    convert(hf_path=tiny_model_path, mlx_path=str(out), quantize=True, q_group_size=64, q_bits=4)
    return str(out)


def test_full_on_a_quantized_folder_is_refused_before_loading(q4_model, tmp_path):
    cfg = write_cfg(tmp_path, **base_cfg(q4_model, small_data(tmp_path), tmp_path / "ad", train_type="full"))
    r = run(["--train-mode", "xpo", "--config", cfg], timeout=60)
    assert r.returncode == 2, (r.stdout[-2000:], r.stderr[-2000:])
    errs = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(errs) == 1 and "Traceback" not in r.stderr, r.stderr
    assert errs[0].startswith("error: train_type: 'full' is not valid")
    assert "already quantized (4-bit affine, group size 64)" in errs[0] and "lora or dora" in errs[0]
    assert "Loading model" not in r.stdout
    assert not (tmp_path / "ad").exists()  # a refused start writes nothing


def test_the_loaded_model_decides_when_the_folder_does_not_say(q4_model, tmp_path, monkeypatch):
    from mlx_xpo_plugin import api
    from mlx_xpo_plugin.commands import runner
    from mlx_xpo_plugin.errors import ConfigError
    from mlx_xpo_plugin.online_dpo_trainer import OnlineDPO

    monkeypatch.setattr(runner, "folder_quantization", lambda folder: None)
    cfg = api.as_config(
        "online_dpo", {**base_cfg(q4_model, small_data(tmp_path), tmp_path / "ad"), "train_type": "full"}
    )
    with pytest.raises(ConfigError, match=r"already quantized \(15 quantized layers, e\.g\. "):
        runner.run(cfg, OnlineDPO, progress=False)
    assert not (tmp_path / "ad").exists()  # refused after loading: the folder it created is removed


@pytest.mark.parametrize("train_type", ["lora", "dora"])
def test_lora_and_dora_on_a_quantized_folder_train(q4_model, tmp_path, train_type):
    out = tmp_path / "ad"
    cfg = write_cfg(
        tmp_path,
        **base_cfg(
            q4_model, small_data(tmp_path), out, train_type=train_type, iters=2, steps_per_eval=100, val_batches=1
        ),
    )
    r = run(["--train-mode", "online_dpo", "--config", cfg])
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.load(open(out / "adapter_config.json"))["fine_tune_type"] == train_type
    keys = set(mx.load(str(out / "adapters.safetensors")))
    assert keys and all(k.endswith(("lora_a", "lora_b", ".m")) for k in keys), sorted(keys)[:5]

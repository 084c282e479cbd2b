"""``wandb: <project>`` reports a run to WandB through upstream's own callback, as upstream's
modes do; without the wandb package the setting is refused before anything loads."""

import importlib.machinery
import sys
import types

import pytest
from test_cli_e2e import base_cfg, small_data

from mlx_xpo_plugin.api import train_method
from mlx_xpo_plugin.errors import ConfigError
from mlx_xpo_plugin.xpo_trainer import XPO


def test_wandb_without_the_package_is_refused_before_anything_is_written(tiny_model_path, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # find_spec: not importable
    out = tmp_path / "ad"
    cfg = {**base_cfg(tiny_model_path, small_data(tmp_path), out, iters=2), "wandb": "my-project"}
    with pytest.raises(ConfigError) as e:
        train_method(XPO, cfg, progress=False)
    assert str(e.value).startswith("wandb: 'my-project'") and "pip install wandb" in str(e.value)
    assert not out.exists()


def test_wandb_receives_the_runs_config_and_every_report(tiny_model_path, tmp_path, monkeypatch):
    import mlx_lm.tuner.callbacks as callbacks

    seen = {"init": [], "log": []}
    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kw: seen["init"].append(kw)
    fake.log = lambda data, step=None: seen["log"].append((step, data))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr(callbacks, "wandb", fake)
    out = tmp_path / "ad"
    cfg = {**base_cfg(tiny_model_path, small_data(tmp_path), out, iters=4), "wandb": "my-project"}
    assert train_method(XPO, cfg, progress=False) == 0
    (init,) = seen["init"]
    assert init["project"] == "my-project" and init["dir"] == str(out) and init["config"]["alpha"] is not None
    train_steps = [step for step, data in seen["log"] if "train_loss" in data]
    assert train_steps and train_steps == sorted(train_steps) and train_steps[-1] == 4

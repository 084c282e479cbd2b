"""A checkpoint keeps its run's settings: ``--resume-adapter-file <folder>`` alone resumes them; a
setting given again must match where it decides what the run computes, may grow (iters), or may
change and is said (reporting, saving, how an endpoint is reached). No model is loaded here."""

import json
import os
import re

import pytest

from mlx_xpo_plugin import config, config_resume
from mlx_xpo_plugin.errors import ConfigError
from mlx_xpo_plugin.loop.checkpoints import FINGERPRINT_KEYS, read_state
from mlx_xpo_plugin.loop.jsonio import dumps

MADE_WITH = {
    "model": "m",
    "data": "d",
    "train": True,
    "adapter_path": "somewhere/else",  # where it was made; the folder it is found in now counts
    "iters": 10,
    "learning_rate": 1e-3,
    "steps_per_report": 10,
    "judge": "http://127.0.0.1:9/v1",
    "judge_config": {"api_key_env": "KEY_A", "temperature": 0.0},
    "resume_adapter_file": "older",
    "config": "old.yaml",
    "start_over": True,
}


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    """A checkpoint at step 4 of an xpo run made with MADE_WITH, in ./ad (cwd: tmp_path)."""
    monkeypatch.chdir(tmp_path)
    cfg = config.resolve("xpo", {}, set(), MADE_WITH)
    (tmp_path / "m").mkdir()
    (tmp_path / "ad" / "checkpoint").mkdir(parents=True)
    state = {"format": 1, "step": 4, "iters": 10, "config": vars(cfg), "fingerprint": {}}
    (tmp_path / "ad" / "checkpoint" / "state.json").write_text(dumps(state))
    return "ad"


def resumed(given: dict, yaml_values=None):
    """(cfg, allowed changes) of ``--train-mode xpo --resume-adapter-file ad`` plus ``given``."""
    cli = {"train_mode": "xpo", "resume_adapter_file": "ad", **given}
    cfg = config_resume.resolve_run("xpo", cli, set(cli), yaml_values or {})
    return cfg, config_resume.check(cfg, *read_state(cfg.resume_adapter_file))


def test_the_folder_alone_resumes_the_checkpoints_settings_into_that_folder(run_dir):
    cfg, changes = resumed({})
    assert changes == []
    assert (cfg.model, cfg.data, cfg.iters, cfg.learning_rate) == ("m", "d", 10, 1e-3)
    assert cfg.judge_config == {"api_key_env": "KEY_A", "temperature": 0.0}
    assert cfg.adapter_path == "ad"  # the resumed folder, as typed
    assert (cfg.config, cfg.start_over, cfg.resume_adapter_file) == (None, False, "ad")  # this command's


@pytest.mark.parametrize(
    "given, named",
    [
        ({"learning_rate": 2e-3}, "learning_rate=0.001, this run has learning_rate=0.002"),
        ({"data": "other"}, "data='d', this run has data='other'"),
        ({"seed": 1}, "seed=0, this run has seed=1"),
        ({"batch_size": 2}, "batch_size=1, this run has batch_size=2"),
        ({"judge": "mlx_xpo_plugin.rules:prefer_letter_e"}, "judge='http://127.0.0.1:9/v1', this run has judge="),
        ({"judge_config": {"api_key_env": "KEY_A", "temperature": 0.5}}, "judge_config.temperature=0.0, this run"),
        ({"iters": 3}, "iters=10, this run has iters=3 (it has done 4 steps: iters may grow, not shrink below"),
    ],
)
def test_a_setting_that_changes_the_computation_is_refused_with_both_values(run_dir, given, named):
    with pytest.raises(ConfigError) as e:
        resumed(given)
    msg = str(e.value)
    assert msg.startswith("resume_adapter_file: 'ad' is not valid; the checkpoint was made with " + named), msg
    assert "\n" not in msg


def test_train_mode_of_another_mode_says_which_to_give(run_dir):
    cli = {"train_mode": "online_dpo", "resume_adapter_file": "ad"}
    cfg = config_resume.resolve_run("online_dpo", cli, set(cli), {})
    with pytest.raises(ConfigError, match=re.escape("train_mode='xpo', this run has train_mode='online_dpo' (resume")):
        config_resume.check(cfg, *read_state("ad"))


def test_settings_that_do_not_change_the_computation_may_change_and_are_named(run_dir):
    cfg, changes = resumed(
        {
            "iters": 80,
            "steps_per_report": 5,
            "judge": "http://127.0.0.1:10/v1",  # the endpoint moved
            "judge_config": {"api_key_env": "KEY_B", "temperature": 0.0},
            "model": "./m",  # the same folder, spelt otherwise: the same setting
        }
    )
    assert changes == [
        "iters=80 (was 10)",
        "steps_per_report=5 (was 10)",
        "judge='http://127.0.0.1:10/v1' (was 'http://127.0.0.1:9/v1')",
        "judge_config.api_key_env='KEY_B' (was 'KEY_A')",
    ]
    assert cfg.model == "m"  # the checkpoint's spelling: its fingerprint matches


def test_a_yaml_given_again_counts_like_flags_and_its_other_folder_is_refused(run_dir, tmp_path):
    with pytest.raises(ConfigError) as e:
        resumed({}, yaml_values={**MADE_WITH, "adapter_path": "elsewhere"})
    assert str(e.value).startswith(
        "adapter_path: 'elsewhere' is not valid; a resumed run writes into the folder it resumes (ad)"
    )
    _, changes = resumed({"adapter_path": os.path.join(str(tmp_path), "ad")}, yaml_values=dict(MADE_WITH))
    assert changes == []  # the same folder, and the same settings


def test_every_setting_has_a_resume_rule_and_the_fingerprint_is_the_same_rule():
    rules = {s.on_resume for s in config.SETTINGS.values()}
    assert rules <= {"same", "free", "length", "folder", "this_run", "judge"}
    assert set(FINGERPRINT_KEYS) == {n for n, s in config.SETTINGS.items() if s.on_resume == "same"}
    assert {"model", "data", "learning_rate", "seed", "batch_size", "max_completion_length"} <= set(FINGERPRINT_KEYS)


def test_the_stored_settings_are_json_and_resolve_again_unchanged(run_dir):
    state = json.load(open("ad/checkpoint/state.json"))
    cfg, _ = resumed({})
    for name, value in state["config"].items():
        if config.SETTINGS[name].on_resume not in ("this_run", "folder"):
            assert config_resume.same(name, getattr(cfg, name), value), name


def test_the_resume_line_names_the_folder_and_how_the_run_was_launched():
    from mlx_xpo_plugin.commands.hints import command, launched_by, resume_line

    train = command("mlx_lm_lora.train")
    assert resume_line("xpo", "runs/my ad") == f"{train} --train-mode xpo --resume-adapter-file 'runs/my ad'"
    mine = ["--train-mode", "xpo", "--config", "x.yaml"]
    launcher = ["/usr/bin/python3", "/opt/bin/mlx.launch", "-n", "2", "--backend", "ring", "/v/bin/python", "-m"]
    launcher += ["mlx_lm_lora.train", *mine]
    prefix = launched_by(mine, launcher)
    assert prefix == "/opt/bin/mlx.launch -n 2 --backend ring /v/bin/python -m mlx_lm_lora.train"
    assert resume_line("online_dpo", "ad", 2, prefix) == f"{prefix} --train-mode online_dpo --resume-adapter-file ad"
    assert launched_by(mine, ["/bin/bash", *mine]) is None  # not started by mlx.launch
    assert launched_by(mine, [*launcher[:-1], "other.yaml"]) is None  # not this process's arguments
    assert resume_line("xpo", "ad", 2, None).startswith("mlx.launch <the options that start 2 processes> ")

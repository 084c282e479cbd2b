"""The settings schema: precedence, validation errors, CLI flags, JSON Schema, the tables of docs/."""

import argparse
import contextlib
import glob
import io
import json
import os
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_xpo_plugin import config as C
from mlx_xpo_plugin import config_views
from mlx_xpo_plugin.errors import ConfigError

BASE = {"train": True, "model": "m", "data": "d"}


def resolve(cli=None, yaml_values=None, explicit=None, mode="xpo"):
    cli = {**BASE, **(cli or {})}
    return C.resolve(mode, cli, set(cli) if explicit is None else explicit, yaml_values or {})


def test_defaults_follow_the_settings_table():
    a = resolve()
    assert (a.beta, a.alpha, a.dpo_cpo_loss_type, a.delta) == (0.1, 1e-5, "sigmoid", 50.0)
    assert (a.max_completion_length, a.temperature, a.judge) == (512, 0.8, "Qwen/Qwen3-0.6B")
    assert a.reference_model_path is None and a.judge_system is None and a.xpo_bonus == "kl"


def test_yaml_values_are_used_where_the_cli_is_silent():
    # upstream's argparse defaults (alpha [1e-5], temperature 1.0, max_completion_length 512)
    # sit in the namespace but were not given: YAML must win over them
    cli = {**BASE, "alpha": [1e-5], "temperature": 1.0, "max_completion_length": 512}
    a = C.resolve("xpo", cli, set(BASE), {"alpha": [1e-4, 1e-5], "temperature": 0.3, "max_completion_length": 17})
    assert (a.alpha, a.temperature, a.max_completion_length) == ([1e-4, 1e-5], 0.3, 17)


def test_explicit_cli_beats_yaml():
    a = C.resolve("xpo", {**BASE, "temperature": 0.5}, set(BASE) | {"temperature"}, {"temperature": 0.3})
    assert a.temperature == 0.5


@pytest.mark.parametrize(
    "yaml_values,pattern",
    [
        ({"alpah": 1e-4}, r"alpah: .*unknown setting.*did you mean 'alpha'"),
        ({"temperature": "hot"}, r"temperature: 'hot' is not valid; expected a number"),
        ({"beta": 0}, r"beta: 0 is not valid; must be > 0"),
        ({"top_p": 1.5}, r"top_p: 1.5 is not valid; must be <= 1.0"),
        ({"dpo_cpo_loss_type": "sigmoidd"}, r"valid: sigmoid, hinge, ipo, dpop"),
        ({"xpo_bonus": "both"}, r"xpo_bonus: 'both' .* valid: kl, kl_upstream, paper"),
        ({"alpha": [1e-4, "x"]}, r"alpha: .*expected a number"),
        ({"alpha": []}, r"alpha: \[\] .*at least one entry"),
        ({"qat_enable": True}, r"qat_enable: True .*QAT is not supported by --train-mode xpo"),
        ({"max_completion_length": 4096}, r"max_completion_length: 4096 .*smaller than max_seq_length"),
        ({"max_completion_length": 0}, r"max_completion_length: 0 .*>= 1"),
        ({"judge_config": "x"}, r"judge_config: 'x' .*mapping"),
        ({"batch_size": 2.5}, r"batch_size: 2.5 .*integer"),
    ],
)
def test_bad_values_give_one_line_errors(yaml_values, pattern):
    with pytest.raises(ConfigError) as e:
        resolve(yaml_values=yaml_values, explicit=set(BASE))
    msg = str(e.value)
    assert "\n" not in msg and re.search(pattern, msg), msg


@pytest.mark.parametrize(
    "mode, values, pattern",
    [
        ("xpo", {"alpah": 1e-4}, r"alpah: 0.0001 is not valid; unknown setting \(did you mean 'alpha'\?\)"),
        ("online_dpo", {"alpha": 1e-4}, r"alpha: 0.0001 .*only used by --train-mode xpo"),
    ],
)
def test_the_python_api_refuses_what_the_yaml_refuses(mode, values, pattern):
    """A dict passed to the API counts every key as given: a misspelt one is not silently dropped."""
    from mlx_xpo_plugin.api import as_config

    with pytest.raises(ConfigError, match=pattern):
        as_config(mode, {"model": "m", "data": "d", **values})


def test_alpha_is_rejected_for_online_dpo():
    with pytest.raises(ConfigError, match="only used by --train-mode xpo"):
        resolve(yaml_values={"alpha": 1e-4}, explicit=set(BASE), mode="online_dpo")


def test_cli_options_parse_with_yaml_style_types():
    p = argparse.ArgumentParser()
    config_views.add_arguments(p.add_argument_group("mlx-xpo-plugin"))
    assert p.parse_args(["--xpo-bonus", "paper"]).xpo_bonus == "paper"
    assert p.parse_args(["--judge-config", "{temperature: 0.2}"]).judge_config == {"temperature": 0.2}
    assert p.parse_args([]).top_k is None  # defaults stay None so that YAML is never masked


def test_json_schema_covers_every_setting():
    s = config_views.json_schema()
    assert set(C.SETTINGS) <= set(s["properties"])
    assert s["properties"]["dpo_cpo_loss_type"]["enum"] == ["sigmoid", "hinge", "ipo", "dpop"]
    assert s["properties"]["temperature"]["default"] == 0.8
    json.dumps(s)


def _between(text: str, start: str, end: str) -> str:
    return text[text.index(start) + len(start) : text.index(end)].strip()


def test_settings_page_table_matches_schema():
    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "settings.md")).read()
    table = _between(doc, "<!-- settings:start -->", "<!-- settings:end -->")
    assert table == config_views.settings_markdown(), (
        "docs/settings.md's table is stale: paste `mlx-xpo schema --markdown` between its markers"
    )


def test_judges_page_lists_every_judge_config_key():
    from mlx_xpo_plugin.judges import function, http, human, llm

    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "judges.md")).read()
    for name, module in (("llm", llm), ("http", http), ("function", function), ("human", human)):
        table = _between(doc, f"<!-- judge_config:{name}:start -->", f"<!-- judge_config:{name}:end -->")
        assert table == config_views.options_markdown(module.OPTIONS), f"docs/judges.md: {name} table is stale"


def test_schema_is_closed_and_rejects_a_misspelt_key():
    from mlx_xpo_plugin.commands.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["schema"]) == 0
    s = json.loads(buf.getvalue())
    assert s["additionalProperties"] is False  # an editor flags what the schema does not list
    assert "alhpa" not in s["properties"] and "alpha" in s["properties"]
    # ... and flags nothing a run accepts: every example config, and every key of upstream's other modes
    for path in glob.glob(os.path.join(os.path.dirname(__file__), "..", "examples", "*.yaml")):
        assert set(C.load_yaml(path)) <= set(s["properties"]), path
    assert C.known_upstream_keys() <= set(s["properties"])
    with pytest.raises(ConfigError, match="alhpa"):
        C.resolve("xpo", {}, set(), {"alhpa": 1e-4})  # the run refuses it too


def test_schema_states_exclusive_maxima():
    s = config_views.json_schema(upstream_keys=set())
    assert s["properties"]["top_p"]["maximum"] == 1.0
    opts = config_views.options_markdown(
        {"m": C.Setting("m", "float", 0.0, "h", minimum=0.0, maximum=1.0, exclusive_maximum=True)}
    )
    assert "a number >= 0.0 < 1.0" in opts


settings_strategy = st.dictionaries(
    st.sampled_from(sorted(C.SETTINGS) + ["alpah", "foo", "temprature"]),
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-5, 5000),
        st.floats(allow_nan=True),
        st.text(max_size=8),
        st.lists(st.floats(-1, 1), max_size=3),
        st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
    ),
    max_size=6,
)


@settings(max_examples=300, deadline=None)
@given(settings_strategy, st.sampled_from(["xpo", "online_dpo"]))
def test_random_configs_end_in_a_config_or_a_clear_error(values, mode):
    try:
        a = C.resolve(mode, {}, set(), {**BASE, **values})
    except ConfigError as e:
        assert "\n" not in str(e) and ":" in str(e)
    else:
        assert a.train_mode == mode


def test_loop_settings_defaults_match_the_settings_table():
    """The Python-level LoopSettings (built directly by the API's power users and the benches) and
    the CLI/YAML table must not drift apart."""
    import dataclasses

    from mlx_xpo_plugin.loop.settings import LoopSettings

    fields = {f.name: f.default for f in dataclasses.fields(LoopSettings) if f.default is not dataclasses.MISSING}
    shared = [n for n in fields if n in C.SETTINGS and n not in ("adapter_path", "iters")]
    assert "micro_batch_size" in shared and len(shared) >= 10
    assert {n: fields[n] for n in shared} == {n: C.SETTINGS[n].default for n in shared}


def test_a_setting_name_with_a_line_break_stays_on_one_line():
    with pytest.raises(ConfigError) as e:
        C.resolve("xpo", {}, set(), {**BASE, "lora_parameters": {"\n": 0}})
    assert "\n" not in str(e.value) and "'lora_parameters.\\n'" in str(e.value)


def test_lora_dropout_is_refused_with_the_kl_form_only():
    dropout = {"lora_parameters": {"rank": 8, "dropout": 0.05, "scale": 10.0}}
    with pytest.raises(ConfigError) as e:
        resolve(yaml_values=dropout, explicit=set(BASE))
    msg = str(e.value)
    assert "\n" not in msg and re.match(
        r"lora_parameters.dropout: 0.05 is not valid; must be 0 with xpo_bonus: kl", msg
    )
    for other in ({"xpo_bonus": "paper"}, {"xpo_bonus": "kl_upstream"}, {"alpha": 0.0}, {"train_type": "full"}):
        resolve(yaml_values={**dropout, **other}, explicit=set(BASE))
    resolve(yaml_values=dropout, explicit=set(BASE), mode="online_dpo")
    resolve(yaml_values={"lora_parameters": {"dropout": 0.0}}, explicit=set(BASE))


def test_upstream_settings_of_other_modes_are_named_as_ignored(tmp_path, capsys):
    """group_size (GRPO) and hf_dataset are upstream's: accepted, but a run says it does not use them."""
    from mlx_xpo_plugin.api import as_config
    from mlx_xpo_plugin.commands.runner import mode_main
    from mlx_xpo_plugin.exits import Exit
    from mlx_xpo_plugin.xpo_trainer import XPO

    want = "note: --train-mode xpo does not use group_size, hf_dataset (settings of upstream's other modes): ignored"
    as_config("xpo", {"model": "m", "data": "d", "group_size": 4, "hf_dataset": {"name": "x"}})
    assert capsys.readouterr().err.strip() == want

    path = tmp_path / "run.yaml"
    path.write_text(
        f"train: true\nmodel: {tmp_path / 'no-model'}\ndata: {tmp_path / 'no-data'}\nhf_dataset: {{name: x}}\n"
    )
    status = mode_main(XPO)({"config": str(path), "train_mode": "xpo", "group_size": 4}, {"config", "group_size"})
    err = capsys.readouterr().err
    assert status == Exit.BAD_INPUT and err.splitlines()[0] == want, err

    as_config("xpo", {"model": "m", "data": "d", "alpha": 1e-4})  # every key read: no note
    assert capsys.readouterr().err == ""

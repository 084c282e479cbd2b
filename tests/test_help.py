"""Help text of the plugin's options: only its own options, in the group the host gives it, with
defaults as YAML writes them; upstream's options are left to upstream and read as it parsed them."""

import argparse

import pytest

from mlx_xpo_plugin import config as C
from mlx_xpo_plugin import config_views


def test_the_plugin_adds_its_own_options_only_with_yaml_defaults():
    p = argparse.ArgumentParser()
    group = p.add_argument_group("mlx-xpo-plugin 0.1.0")
    config_views.add_arguments(group)
    added = set(vars(p.parse_args([]))) - {"help"}
    assert added == {s.name for s in C.PLUGIN_SETTINGS} - config_views.UPSTREAM_OPTIONS
    text = " ".join(p.format_help().split())
    assert "--judge-system JUDGE_SYSTEM [xpo/online_dpo] Rubric system prompt" in text
    assert "Default: null." in text and "None" not in text and "Default: {}." in text  # judge_config


def test_upstream_defines_every_option_the_plugin_leaves_to_it():
    """Against the installed release: the options the plugin reads from upstream exist there, and
    every option the plugin adds is new to it (argparse would refuse it otherwise)."""
    from mlx_lm_lora.train import build_parser

    parser = getattr(build_parser, "__wrapped__", build_parser)()  # upstream's own (the hook adds ours)
    upstream = set(vars(parser.parse_args([])))
    assert config_views.UPSTREAM_OPTIONS <= upstream
    assert not upstream & ({s.name for s in C.PLUGIN_SETTINGS} - config_views.UPSTREAM_OPTIONS)
    config_views.add_arguments(parser.add_argument_group("mlx-xpo-plugin"))  # no ArgumentError


@pytest.mark.parametrize(
    "typed, given",
    [
        (list("1e-4"), 1e-4),  # a stock release: type=list[float] splits the text into characters
        (list("1e-4,1e-5"), [1e-4, 1e-5]),
        ([1e-4], 1e-4),  # a release whose --alpha takes numbers (nargs="+", type=float)
        ([1e-4, 1e-5], [1e-4, 1e-5]),
    ],
)
def test_upstreams_alpha_is_read_in_both_forms(typed, given):
    args = argparse.Namespace(alpha=typed, beta=0.2)
    read = config_views.read_upstream_options(args)
    assert C.check_value(C.SETTINGS["alpha"], read.alpha) == given and read.beta == 0.2
    assert args.alpha == typed  # upstream's namespace is left as it was
    assert config_views.read_upstream_options({"alpha": typed})["alpha"] == read.alpha  # a dict too


def test_a_stock_alpha_on_the_command_line_reaches_the_settings_check():
    from mlx_lm_lora.train import build_parser

    typed = build_parser().parse_args(["--alpha", "1e-4,1e-5"]).alpha
    assert C.check_value(C.SETTINGS["alpha"], config_views.read_upstream_options({"alpha": typed})["alpha"]) == [
        1e-4,
        1e-5,
    ]


def test_yaml_text_reads_back_as_the_value():
    import yaml

    for v in (None, True, False, 1e-05, 0.1, [1e-4, 1e-5], "kl", {}, 512, "Qwen/Qwen3-0.6B"):
        assert yaml.safe_load(config_views.yaml_text(v)) == v and "\n" not in config_views.yaml_text(v)

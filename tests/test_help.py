"""Help text of the plugin's options: one group, defaults as YAML writes them."""

import argparse

from mlx_xpo_plugin import config as C
from mlx_xpo_plugin import config_views


def parser_with_upstream_options():
    p = argparse.ArgumentParser()
    up = p.add_argument_group("upstream's own")
    up.add_argument("--alpha", type=list, default=None, help="upstream's alpha")
    up.add_argument("--beta", type=float, default=None, help="upstream's beta")
    return p


def test_every_plugin_option_is_in_one_group_with_yaml_defaults():
    p = parser_with_upstream_options()
    config_views.add_arguments(p)
    ours = [g for g in p._action_groups if g.title.startswith("online preference")]
    assert len(ours) == 1
    dests = {a.dest for a in ours[0]._group_actions}
    assert {s.name for s in C.PLUGIN_SETTINGS} <= dests  # alpha and beta moved in from upstream's group
    upstream = next(g for g in p._action_groups if g.title == "upstream's own")
    assert not upstream._group_actions
    helps = {a.dest: a.help for a in ours[0]._group_actions}
    assert "Default: null." in helps["judge_system"] and "None" not in helps["judge_system"]
    assert "Default: 1.0e-05." in helps["alpha"] and "Default: {}." in helps["judge_config"]
    text = p.format_help()
    assert "online preference (xpo, online_dpo; mlx-xpo-plugin)" in text


def test_yaml_text_reads_back_as_the_value():
    import yaml

    for v in (None, True, False, 1e-05, 0.1, [1e-4, 1e-5], "kl", {}, 512, "Qwen/Qwen3-0.6B"):
        assert yaml.safe_load(config_views.yaml_text(v)) == v and "\n" not in config_views.yaml_text(v)

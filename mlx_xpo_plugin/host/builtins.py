"""This project's hook implementations: the xpo and online_dpo train modes and the built-in judges.

It is the module named in the ``mlx_lm_lora`` entry-point group, so built-ins register exactly
as third-party plugins do.
"""

from __future__ import annotations

from mlx_xpo_plugin import __version__, config_views
from mlx_xpo_plugin.commands.runner import mode_main
from mlx_xpo_plugin.contracts import TrainMode, hookimpl
from mlx_xpo_plugin.judges.builtin import BUILTIN_JUDGE_FACTORIES
from mlx_xpo_plugin.online_dpo_trainer import OnlineDPO
from mlx_xpo_plugin.xpo_trainer import XPO

_DESCRIPTIONS = {
    "xpo": "XPO: online DPO with an exploration bonus (alpha; per-epoch schedule)",
    "online_dpo": "Online DPO: completions sampled each step and labelled by a judge",
}


def _mode(name: str) -> TrainMode:
    method = {"xpo": XPO, "online_dpo": OnlineDPO}[name]
    return TrainMode(
        name=name,
        description=_DESCRIPTIONS[name],
        main=mode_main(method),
        add_arguments=config_views.add_arguments,
        plugin=f"mlx-xpo-plugin {__version__}",
    )


@hookimpl
def register_train_modes(register):
    register(_mode("xpo"))
    register(_mode("online_dpo"))


@hookimpl
def register_judges(register):
    for factory in BUILTIN_JUDGE_FACTORIES:
        register(factory)

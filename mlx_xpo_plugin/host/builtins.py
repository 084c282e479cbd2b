"""This project's hook implementations: the xpo and online_dpo train modes and the built-in judges.

It is the module named in the ``mlx_lm_lora`` entry-point group, so built-ins register exactly
as third-party plugins do. Both modes share one ``add_arguments`` (a host calls it once) and read
upstream's own options (--beta, --alpha, --temperature, --judge, ...) as upstream parsed them.
"""

from __future__ import annotations

from mlx_xpo_plugin import config_views
from mlx_xpo_plugin.contracts import TrainMode, hookimpl
from mlx_xpo_plugin.judges.builtin import BUILTIN_JUDGE_FACTORIES

_DESCRIPTIONS = {
    "xpo": "XPO: online DPO with an exploration bonus (alpha; per-epoch schedule)",
    "online_dpo": "Online DPO: completions sampled each step and labelled by a judge",
}


def _main(name: str):
    """The mode's ``main(args, given)``: upstream's forms of its options read, then the run."""

    def main(args, given, **kwargs) -> int:
        # here, not at the top: every host (upstream's CLI, its MCP server, --help) imports this
        # module to list the modes, and the trainers pull in MLX and mlx-lm (seconds)
        from mlx_xpo_plugin.commands.runner import mode_main
        from mlx_xpo_plugin.online_dpo_trainer import OnlineDPO
        from mlx_xpo_plugin.xpo_trainer import XPO

        run = mode_main({"xpo": XPO, "online_dpo": OnlineDPO}[name])
        return run(config_views.read_upstream_options(args), given, **kwargs)

    main.__name__ = f"{name}_main"
    return main


def _mode(name: str) -> TrainMode:
    return TrainMode(
        name=name, description=_DESCRIPTIONS[name], main=_main(name), add_arguments=config_views.add_arguments
    )


@hookimpl
def register_train_modes(register):
    register(_mode("xpo"))
    register(_mode("online_dpo"))


@hookimpl
def register_judges(register):
    for factory in BUILTIN_JUDGE_FACTORIES:
        register(factory)

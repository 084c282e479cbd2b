"""A third-party test plugin for mlx_lm_lora: train mode "echo_mode".

It depends on nothing but pluggy (not on mlx_xpo_plugin): the train-mode contract is duck-typed.
Its ``main`` writes ``args``/``given`` as JSON to the file named by its ``echo_out`` setting
(``--echo-out`` on the command line, or in the dict / YAML) and returns ``echo_status`` (0).
"""

import json

import pluggy

hookimpl = pluggy.HookimplMarker("mlx_lm_lora")


class EchoMode:
    name = "echo_mode"
    description = "test mode: writes its arguments as JSON and exits"

    def add_arguments(self, group):  # the host's argument group of this plugin: own options only
        group.add_argument("--echo-out", type=str, default=None, help="file the JSON goes to")
        group.add_argument("--echo-status", type=int, default=None, help="exit status to return")

    def main(self, args, given):
        out = {
            "args": vars(args),
            "explicit": sorted(given),
            "args_type": f"{type(args).__module__}.{type(args).__name__}",
        }
        with open(args.echo_out, "w") as f:
            json.dump(out, f, default=repr, indent=1, sort_keys=True)
        print(f"echo_mode wrote {args.echo_out}")
        return args.echo_status or 0


@hookimpl
def register_train_modes(register):
    register(EchoMode())

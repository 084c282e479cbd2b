"""A test plugin whose mode is named "dpo": it replaces upstream's built-in dpo mode.

Its ``main`` writes ``{"explicit": [...], "train_mode": ...}`` as JSON to the file named by the
environment variable ``REPLACE_PLUGIN_OUT`` and returns 0.
"""

import json
import os

import pluggy

hookimpl = pluggy.HookimplMarker("mlx_lm_lora")


class ReplacingDPO:
    name = "dpo"
    description = "test mode replacing the built-in dpo"
    add_arguments = None
    plugin = ""

    def banner(self):
        return f"{self.name}: replace-plugin 1.0, replaces the built-in mode"

    def main(self, args, explicit):
        with open(os.environ["REPLACE_PLUGIN_OUT"], "w") as f:
            json.dump({"explicit": sorted(explicit), "train_mode": args.train_mode}, f)
        return 0


@hookimpl
def register_train_modes(register):
    register(ReplacingDPO())

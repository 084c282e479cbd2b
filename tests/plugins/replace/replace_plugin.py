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

    def main(self, args, given):
        with open(os.environ["REPLACE_PLUGIN_OUT"], "w") as f:
            json.dump({"explicit": sorted(given), "train_mode": args.train_mode}, f)
        return 0


@hookimpl
def register_train_modes(register):
    register(ReplacingDPO())

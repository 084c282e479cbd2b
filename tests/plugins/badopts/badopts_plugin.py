"""A test plugin whose mode adds an option that upstream already has (--model): argparse refuses it."""

import pluggy

hookimpl = pluggy.HookimplMarker("mlx_lm_lora")


class BadOptsMode:
    name = "badopts_mode"
    description = "adds --model a second time"

    def add_arguments(self, group):
        group.add_argument("--badopts-knob", type=int, default=None)  # added before the failure
        group.add_argument("--model", type=str)

    def main(self, args, given):
        return 0


@hookimpl
def register_train_modes(register):
    register(BadOptsMode())

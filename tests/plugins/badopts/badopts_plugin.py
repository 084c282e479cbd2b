"""A test plugin whose mode adds an option that upstream already has (--model): argparse refuses it."""

import pluggy

hookimpl = pluggy.HookimplMarker("mlx_lm_lora")


class BadOptsMode:
    name = "badopts_mode"
    description = "adds --model a second time"
    plugin = ""

    def add_arguments(self, parser):
        parser.add_argument("--badopts-knob", type=int, default=None)  # added before the failure
        parser.add_argument("--model", type=str)

    def banner(self):
        return f"{self.name}: badopts-plugin"

    def main(self, args, explicit):
        return 0


@hookimpl
def register_train_modes(register):
    register(BadOptsMode())

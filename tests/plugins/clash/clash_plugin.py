"""A test plugin registering the train mode name "echo_mode", which echo_plugin registers too."""

import pluggy

hookimpl = pluggy.HookimplMarker("mlx_lm_lora")


class ClashMode:
    name = "echo_mode"
    description = "test mode whose name clashes with echo_plugin's"
    add_arguments = None
    plugin = ""

    def banner(self):
        return f"{self.name}: clash-plugin"

    def main(self, args, explicit):
        return 0


@hookimpl
def register_train_modes(register):
    register(ClashMode())

"""A test plugin registering the train mode name "echo_mode", which echo_plugin registers too."""

import pluggy

hookimpl = pluggy.HookimplMarker("mlx_lm_lora")


class ClashMode:
    name = "echo_mode"
    description = "test mode whose name clashes with echo_plugin's"
    add_arguments = None

    def main(self, args, given):
        return 0


@hookimpl
def register_train_modes(register):
    register(ClashMode())

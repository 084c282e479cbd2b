"""A test plugin that imports, but whose register_train_modes hook raises (after offering a mode)."""

import pluggy

hookimpl = pluggy.HookimplMarker("mlx_lm_lora")


class HalfMode:
    name = "half_mode"
    description = "offered before the hook fails: must not be registered"
    add_arguments = None

    def main(self, args, given):
        return 0


@hookimpl
def register_train_modes(register):
    register(HalfMode())
    raise RuntimeError("failreg_plugin: registration always fails")

"""A test plugin that imports, but whose register_train_modes hook raises (after offering a mode)."""

import pluggy

hookimpl = pluggy.HookimplMarker("mlx_lm_lora")


class HalfMode:
    name = "half_mode"
    description = "offered before the hook fails: must not be registered"
    add_arguments = None
    plugin = ""

    def banner(self):
        return f"{self.name}: failreg-plugin"

    def main(self, args, explicit):
        return 0


@hookimpl
def register_train_modes(register):
    register(HalfMode())
    raise RuntimeError("failreg_plugin: registration always fails")

"""Everything is configured in pyproject.toml; this file only adds the build step that puts
``mlx_xpo_plugin.pth`` at the top of site-packages, for ``pip install .`` and
``pip install -e .`` alike. The .pth holds one line that imports ``mlx_xpo_plugin.host._bootstrap``
unless ``MLX_XPO_PLUGIN=0`` (path 2: our train modes in a stock mlx-lm-lora; see
mlx_xpo_plugin/host/activation.py).

* regular wheel: the file is written into ``build_lib``, whose top level becomes site-packages.
* editable wheel (PEP 660): setuptools' ``editable_wheel`` runs the build sub-commands with
  ``editable_mode = True`` and an ``install`` command whose ``install_lib`` is the folder the
  editable wheel is made from (where it also puts data files and scripts); the file goes there.
Either way it is listed in the wheel's RECORD, so ``pip uninstall`` removes it.

On Linux it also builds ``mlx_xpo_plugin.cpu._skinny``, the few-row product kernel decoding runs
on (mlx_xpo_plugin/cpu/skinny.py). It is optional: where no C compiler is found the package is
installed without it, and decoding's products go to the BLAS (the run's banner says so).
"""

import os
import sys

from setuptools import Command, Extension, setup
from setuptools.command.build import build

PTH_NAME = "mlx_xpo_plugin.pth"
# One line, as setuptools' own distutils-precedence.pth: with MLX_XPO_PLUGIN=0 nothing is imported.
PTH_TEXT = (
    "import os; os.environ.get('MLX_XPO_PLUGIN', '1').strip().lower() in "
    "('0', 'false', 'no', 'off') or __import__('mlx_xpo_plugin.host._bootstrap')\n"
)


class build_pth(Command):
    description = f"write {PTH_NAME} (start-up hook of mlx_xpo_plugin.host.activation)"
    user_options = []

    def initialize_options(self):
        self.build_lib = None
        self.editable_mode = False  # set by setuptools' editable_wheel

    def finalize_options(self):
        self.set_undefined_options("build_py", ("build_lib", "build_lib"))

    def _target(self):
        if self.editable_mode:
            return os.path.join(self.get_finalized_command("install").install_lib, PTH_NAME)
        return os.path.join(self.build_lib, PTH_NAME)

    def run(self):
        target = self._target()
        self.mkpath(os.path.dirname(target))
        with open(target, "w", encoding="utf-8") as f:
            f.write(PTH_TEXT)
        self.announce(f"wrote {target}", level=2)

    def get_outputs(self):
        return [] if self.editable_mode else [os.path.join(self.build_lib, PTH_NAME)]

    def get_source_files(self):
        return []

    def get_output_mapping(self):
        return {}


class build_with_pth(build):
    sub_commands = build.sub_commands + [("build_pth", None)]


SKINNY = Extension(
    "mlx_xpo_plugin.cpu._skinny",
    sources=["mlx_xpo_plugin/cpu/skinny.c"],
    depends=["mlx_xpo_plugin/cpu/skinny_dot.h"],
    extra_compile_args=["-O3", "-pthread", "-Wno-psabi"],  # psabi: GCC's note on 32-byte vector arguments
    extra_link_args=["-pthread"],
    optional=True,
)

setup(
    cmdclass={"build": build_with_pth, "build_pth": build_pth},
    ext_modules=[SKINNY] if sys.platform == "linux" else [],
)

"""Start-up hook of path 2, imported by ``mlx_xpo_plugin.pth`` in site-packages.

It must stay cheap and can never fail: it only puts a tiny finder at the front of
``sys.meta_path``, which ignores every import except two:

* ``mlx.core``: in this project's commands (or everywhere with ``MLX_XPO_BLAS_SCOPE=all``),
  :func:`mlx_xpo_plugin.cpu.fast_blas.preload` first puts a fast BLAS under MLX on Linux CPUs
  (standard library only; see that module), then the import proceeds as usual;
* ``mlx_lm_lora.__main__`` (``python -m mlx_lm_lora``): handed to the activation code, which keeps
  the status of ``main`` as the exit status;
* ``mlx_lm_lora.train``: marks the process as one of this project's commands
  (:func:`mlx_xpo_plugin.cpu.fast_blas.request`), and only then is :mod:`mlx_xpo_plugin.host.activation`
  imported (and through it pluggy, our registry, ...).

``MLX_XPO_PLUGIN=0`` in the environment turns the whole thing off (the .pth line then does not
even import this module; the check here covers other ways of importing it).
Keep ``mlx_xpo_plugin/__init__.py`` free of imports: it runs in every interpreter too.
"""

import sys

from mlx_xpo_plugin.host.startup import MLX_CORE, PACKAGE_MAIN, TARGET, enabled, report


class TrainModuleFinder:
    """``sys.meta_path`` entry that hands ``mlx_lm_lora.train`` to the activation code (and
    preloads a fast BLAS before ``mlx.core``)."""

    mlx_xpo_plugin = True  # recognised by install() even across reloads of this module

    def find_spec(self, fullname, path=None, target=None):
        if fullname == MLX_CORE:
            try:
                from mlx_xpo_plugin.cpu import fast_blas

                why = fast_blas.in_scope()
                if why:
                    fast_blas.preload(quiet=why == "ours")  # our runs' banner says what happened
            except Exception as e:  # never break an import
                report(e)
            return None
        if fullname not in (TARGET, PACKAGE_MAIN):
            return None
        try:
            if fullname == TARGET:
                from mlx_xpo_plugin.cpu import fast_blas

                fast_blas.request()
            from mlx_xpo_plugin.host import activation

            return activation.find_spec(self, fullname, path, target)
        except Exception as e:  # never break an import
            report(e)
            return None

    def invalidate_caches(self):
        pass


def install() -> None:
    try:
        if enabled() and not any(getattr(f, "mlx_xpo_plugin", False) for f in sys.meta_path):
            sys.meta_path.insert(0, TrainModuleFinder())
    except Exception as e:
        report(e)


install()

"""The start-up hook's switch and its one error line, shared by the hook (_bootstrap.py) and the
activation code (activation.py). Standard library only: it is imported in every interpreter of an
environment with the hook installed."""

import os
import sys

TARGET = "mlx_lm_lora.train"
PACKAGE_MAIN = "mlx_lm_lora.__main__"  # python -m mlx_lm_lora train
MLX_CORE = "mlx.core"
#: values of an on/off environment variable that mean off, and on
OFF_VALUES = ("0", "false", "no", "off")
ON_VALUES = ("1", "true", "yes", "on")


def enabled() -> bool:
    return os.environ.get("MLX_XPO_PLUGIN", "1").strip().lower() not in OFF_VALUES


def plugins_enabled() -> bool:
    """Whether train modes from plugins are hosted: off with ``MLX_XPO_PLUGIN=0`` (the whole start-up
    hook) or with upstream's own switch, ``MLX_LM_LORA_PLUGINS=0`` (a patched mlx-lm-lora then
    loads no plugin; here the stock one runs unchanged, while this package's commands keep their
    fast BLAS)."""
    return enabled() and os.environ.get("MLX_LM_LORA_PLUGINS", "1").strip().lower() not in OFF_VALUES


_reported = False


def report(exc) -> None:
    """Say once, on one stderr line, that activation failed and upstream runs unchanged."""
    global _reported
    if _reported:
        return
    _reported = True
    try:
        what = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
        what = " ".join(str(what).split())
        sys.stderr.write(
            f"mlx-xpo-plugin: activation failed ({what}); mlx-lm-lora runs "
            f"unchanged (set MLX_XPO_PLUGIN=0 to silence this)\n"
        )
    except Exception:
        pass

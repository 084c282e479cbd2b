"""mlx-xpo-plugin: XPO and Online DPO train modes for mlx-lm-lora.

Everything a plugin author needs is importable from here (``from mlx_xpo_plugin import TrainMode,
hookimpl, Verdict, JudgeFactory``): the names of :mod:`.contracts`, plus ``ConfigError``. They
are loaded on first use, since this file runs in every interpreter of an environment that has
the start-up hook installed (see _bootstrap.py).
"""

__version__ = "0.1.0"

_EXPORTS = {
    **{
        name: "contracts"
        for name in (
            "TrainMode",
            "Verdict",
            "PairwiseJudge",
            "Judge",
            "JudgeFactory",
            "JudgeContext",
            "hookimpl",
            "hookspec",
            "as_judge",
        )
    },
    "ConfigError": "errors",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mlx_xpo_plugin' has no attribute {name!r}")
    import importlib  # on first use only: see the module docstring

    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)

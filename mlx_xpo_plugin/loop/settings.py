"""What the training loop reads: the loop's share of the settings table (config.SETTINGS), with
the same names, defaults and help, plus the run's number of steps and the progress bar. (The
mode is the method the loop is given: loop.method.OnlineDPO or xpo_trainer.XPO.)

``LoopSettings(iters=40, batch_size=4, alpha=1e-3)`` is how Python callers (the benches, the
tests) build one; a run from YAML or the command line uses :func:`from_config`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from mlx_xpo_plugin import config
from mlx_xpo_plugin.compute.rollout import SamplingConfig

#: settings-table names the loop reads
LOOP_KEYS = (
    "batch_size",
    "gradient_accumulation_steps",
    "micro_batch_size",
    "beta",
    "alpha",
    "xpo_bonus",
    "dpo_cpo_loss_type",
    "delta",
    "max_completion_length",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "missing_eos_penalty",
    "entropy_coef",
    "steps_per_report",
    "steps_per_eval",
    "val_batches",
    "save_every",
    "log_completions_every",
    "max_nonfinite_steps",
    "max_judgeless_steps",
    "seed",
    "adapter_path",
)


def _field(name: str):
    s = config.SETTINGS[name]
    return (name, Any, dataclasses.field(default=s.default, metadata={"help": s.help}))


def _sampling(self) -> SamplingConfig:
    return SamplingConfig(
        max_tokens=self.max_completion_length,
        temperature=self.temperature,
        top_p=self.top_p,
        top_k=self.top_k,
        min_p=self.min_p,
    )


LoopSettings = dataclasses.make_dataclass(
    "LoopSettings",
    [("iters", int, dataclasses.field(metadata={"help": "optimizer steps of the run"}))]
    + [_field(k) for k in LOOP_KEYS]
    + [("progress", bool, dataclasses.field(default=True, metadata={"help": "show a progress bar"}))],
    namespace={"__doc__": __doc__, "sampling": property(_sampling, doc="the SamplingConfig of rollouts")},
)


def from_config(cfg, iters: int, progress: bool = True):
    """The loop settings of a resolved run config (config.resolve)."""
    return LoopSettings(iters=iters, progress=progress, **{k: getattr(cfg, k) for k in LOOP_KEYS})

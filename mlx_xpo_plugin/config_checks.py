"""The checks of a resolved run config that involve more than one setting (config.resolve runs
them after every value has passed its own check)."""

from __future__ import annotations

import os

from mlx_xpo_plugin.errors import ConfigError


def check_cross(a) -> None:
    if a.qat_enable:
        raise ConfigError(
            "qat_enable",
            True,
            f"QAT is not supported by --train-mode {a.train_mode}; remove qat_enable (QAT applies to sft only)",
        )
    if a.max_completion_length >= a.max_seq_length:
        raise ConfigError(
            "max_completion_length",
            a.max_completion_length,
            f"must be smaller than max_seq_length ({a.max_seq_length}) to leave room for the prompt",
        )
    if a.adapter_path and os.path.isfile(a.adapter_path):
        raise ConfigError("adapter_path", a.adapter_path, "is a file; give a folder for adapters and metrics")
    if not (a.train or a.test):
        raise ConfigError("train", a.train, "set train: true (or --train) and/or test: true (or --test)")
    quant = [k for k in ("load_in_4bits", "load_in_6bits", "load_in_8bits", "load_in_mxfp4") if getattr(a, k)]
    if len(quant) > 1:
        raise ConfigError(quant[1], True, f"choose one quantization; {quant[0]} is already set")
    lp = a.lora_parameters
    for key in lp:
        if key not in ("rank", "dropout", "scale", "keys", "alpha"):
            raise ConfigError(f"lora_parameters.{key}", lp[key], "unknown key; valid: rank, dropout, scale, keys")
    _check_dropout(a)


def _check_dropout(a) -> None:
    """The 'kl' term's gradient is a score function of the sampler: dropout (on in training, off
    in rollouts) would score completions under another distribution than the one that sampled."""
    dropout = a.lora_parameters.get("dropout", 0.0)
    alphas = a.alpha if isinstance(a.alpha, list) else [a.alpha]
    used = a.train_mode == "xpo" and a.xpo_bonus == "kl" and a.train_type != "full" and max(alphas) > 0
    if used and isinstance(dropout, (int, float)) and dropout > 0:
        raise ConfigError(
            "lora_parameters.dropout",
            dropout,
            "must be 0 with xpo_bonus: kl (its gradient needs the log-probs of the policy that "
            "sampled, and rollouts run without dropout)",
            "set dropout: 0, or use xpo_bonus: paper or kl_upstream",
        )

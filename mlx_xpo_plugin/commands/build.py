"""The parts of a run, built from a resolved config: the models, the judge, the trainer.

Policy: upstream's loader (so LoRA/DoRA/full and quantization behave as in upstream); reference:
the base weights with adapters off (LoRA/DoRA) or a frozen model (full fine-tuning, or
``reference_model_path``); a model judge shares already-loaded weights where it names them.
Nothing here writes to ``adapter_path`` (the runner's train step does, once training starts).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Optional

import mlx.core as mx
import mlx.optimizers as optim

from mlx_xpo_plugin import config
from mlx_xpo_plugin.commands.hints import verbose
from mlx_xpo_plugin.compute.models import model_folder, same_folder
from mlx_xpo_plugin.compute.quantized import quantized_layers, refuse_full
from mlx_xpo_plugin.contracts import JudgeContext, as_judge
from mlx_xpo_plugin.loop.atomic import save_json
from mlx_xpo_plugin.loop.settings import from_config as loop_settings
from mlx_xpo_plugin.loop.trainer import OnlineTrainer


@dataclass
class Models:
    """What :func:`load_models` loaded: the policy and its tokenizer, the frozen reference (with
    ``separate``, its own model where there is one), the policy's precision record, its folder."""

    model: Any
    tokenizer: Any
    reference: Any
    separate: Any
    precision: Any
    model_path: str


def plan_steps(cfg, n_prompts: int, world: int = 1) -> tuple[int, int, int]:
    """(optimizer steps, steps per epoch, prompts per step) of a run: every process of an
    ``mlx.launch`` group takes its own ``batch_size * gradient_accumulation_steps`` prompts of
    each step, so an epoch of ``n_prompts`` takes ceil(n_prompts / (that * world)) steps."""
    per_step = cfg.batch_size * cfg.gradient_accumulation_steps * max(1, world)
    steps_per_epoch = max(1, math.ceil(n_prompts / per_step))
    return cfg.iters or (cfg.epochs or 1) * steps_per_epoch, steps_per_epoch, per_step


def build_optimizer(cfg):
    from mlx_lm.tuner.utils import build_schedule

    lr = build_schedule(cfg.lr_schedule) if cfg.lr_schedule else cfg.learning_rate
    cls = {"adam": optim.Adam, "adamw": optim.AdamW, "muon": optim.Muon}[cfg.optimizer]
    return cls(learning_rate=lr, **(cfg.optimizer_config or {}).get(cfg.optimizer, {}))


def quantization(cfg) -> Optional[dict]:
    if cfg.load_in_4bits:
        return {"bits": 4, "group_size": 64}
    if cfg.load_in_6bits:
        return {"bits": 6, "group_size": 64}
    if cfg.load_in_8bits:
        return {"bits": 8, "group_size": 64}
    if cfg.load_in_mxfp4:
        return {"bits": 4, "group_size": 32, "mode": "mxfp4"}
    return None


def lora_parameters(cfg) -> dict:
    """rank / dropout / scale: the user's values over the defaults."""
    return dict(config.SETTINGS["lora_parameters"].default, **(cfg.lora_parameters or {}))


def write_adapter_config(cfg) -> None:
    """adapter_config.json in the form mlx_lm.load(..., adapter_path=...) reads."""
    save_json(
        os.path.join(cfg.adapter_path, "adapter_config.json"),
        {
            "fine_tune_type": cfg.train_type,
            "num_layers": cfg.num_layers,
            "lora_parameters": lora_parameters(cfg),
            "model": cfg.model,
            "train_mode": cfg.train_mode,
        },
    )


def trained_adapters(cfg) -> Optional[str]:
    """For a test-only run: the adapters in ``adapter_path``, taking train_type /
    lora_parameters / num_layers from their adapter_config.json (evaluated as trained)."""
    trained = os.path.join(cfg.adapter_path, "adapters.safetensors")
    if cfg.train or not os.path.isfile(trained):
        return None
    path = os.path.join(cfg.adapter_path, "adapter_config.json")
    if os.path.isfile(path):
        with open(path) as f:
            ac = json.load(f)
        cfg.train_type = ac.get("fine_tune_type", cfg.train_type)
        cfg.lora_parameters = ac.get("lora_parameters", cfg.lora_parameters)
        cfg.num_layers = ac.get("num_layers", cfg.num_layers)
    return trained


def load_policy(cfg, model_path: str):
    """(model, tokenizer) with adapters attached; refuses full fine-tuning of quantized layers."""
    from mlx_lm_lora.utils import from_pretrained

    lora = None
    if cfg.train_type in ("lora", "dora"):
        lora = {**lora_parameters(cfg), "use_dora": cfg.train_type == "dora", "num_layers": cfg.num_layers}
    with contextlib.nullcontext() if verbose() else contextlib.redirect_stdout(io.StringIO()):  # "Loading ..."
        model, tokenizer, _ = from_pretrained(
            model=model_path, new_adapter_path=None, lora_config=lora, quantized_load=quantization(cfg)
        )  # new_adapter_path=None: nothing is written while loading
    q = quantized_layers(model) if cfg.train and cfg.train_type == "full" else None
    if q:  # the loaded model decides
        raise refuse_full(cfg.model, f"{len(q)} quantized layers, e.g. {q[0]}")
    return model, tokenizer


def load_models(cfg) -> Models:
    """The policy (with trained adapters for a test-only run), its precision, the reference."""
    from mlx_lm import load as mlx_load

    from mlx_xpo_plugin.compute.precision import apply as set_precision
    from mlx_xpo_plugin.compute.reference import Reference

    model_path = model_folder("model", cfg.model)
    trained = trained_adapters(cfg)
    model, tokenizer = load_policy(cfg, model_path)
    if trained:
        model.load_weights(trained, strict=False)
        print(f"adapters: loaded {trained}")
    # after every check of the loaded checkpoint: the dequantized layers stay frozen, as quantized ones are
    precision = set_precision(model, cfg.compute_dtype, "policy", keep_original=cfg.fuse and cfg.train)
    separate = None
    if cfg.reference_model_path or cfg.train_type == "full":
        separate, _ = mlx_load(model_folder("reference_model_path", cfg.reference_model_path or model_path))
        set_precision(separate, cfg.compute_dtype, "reference")
        separate.freeze()
    if verbose():
        what = f"frozen model from {cfg.reference_model_path or model_path}" if separate is not None else None
        print(f"reference: {what or 'the base weights with adapters switched off (no second copy)'}")
    return Models(model, tokenizer, Reference(model, separate), separate, precision, model_path)


def judge_weights(cfg, model_path: str, model, separate):
    """The already-loaded weights a model judge can share, or None (the judge loads its own).

    judge == reference_model_path: the separate reference; judge == the policy's base model:
    the policy with adapters off (LoRA/DoRA), or the frozen copy loaded for full fine-tuning.
    """
    from mlx_xpo_plugin.compute.reference import BaseView

    if cfg.reference_model_path and same_folder(cfg.judge, cfg.reference_model_path):
        return separate
    if same_folder(cfg.judge, cfg.model) or same_folder(cfg.judge, model_path):
        if cfg.train_type in ("lora", "dora"):
            return BaseView(model)
        if not cfg.reference_model_path:
            return separate
    return None


def build_the_judge(cfg, m: Models):
    """The judge ``cfg.judge`` names, sharing loaded weights where it can (see judge_weights)."""
    from mlx_xpo_plugin.host.registry import build_judge

    shared = judge_weights(cfg, m.model_path, m.model, m.separate)
    if shared is not None and verbose():
        print("judge: shares the reference's weights (no extra copy)")
    ctx = JudgeContext(
        cfg.judge_system,
        dict(cfg.judge_config),
        reference_model=shared,
        reference_tokenizer=m.tokenizer if shared is not None else None,
        reference_model_path=cfg.judge if shared is not None else cfg.reference_model_path,
        seed=cfg.seed,
        compute_dtype=cfg.compute_dtype,
    )
    return as_judge(build_judge(cfg.judge, ctx))


def reporting(cfg, training_callback):
    """The training callback, wrapped in upstream's WandB reporting when ``wandb`` names a project
    (a training run, process 0), as upstream's own modes do."""
    if not (cfg.wandb and cfg.train) or mx.distributed.init().rank() != 0:
        return training_callback
    from mlx_lm.tuner.callbacks import WandBCallback  # imports wandb: only when asked for

    config = dict(vars(cfg))
    return WandBCallback(cfg.wandb, log_dir=cfg.adapter_path, config=config, wrapped_callback=training_callback)


def build_trainer(cfg, method_cls, m: Models, judge, training_callback, progress: bool) -> OnlineTrainer:
    """The one OnlineTrainer of a run: on the training prompts (a test-only run: the test
    prompts, one step planned), with the config it records in its checkpoints."""
    from mlx_xpo_plugin.commands.data import load_prompts
    from mlx_xpo_plugin.loop.checkpoints import fingerprint

    max_prompt = cfg.max_seq_length - cfg.max_completion_length
    prompts = load_prompts(cfg.data, "train" if cfg.train else "test", m.tokenizer, max_prompt)
    valid = load_prompts(cfg.data, "valid", m.tokenizer, max_prompt, required=False) if cfg.train else None
    iters = plan_steps(cfg, len(prompts), mx.distributed.init().size())[0] if cfg.train else 1
    if cfg.grad_checkpoint and cfg.train:
        from mlx_lm.tuner.trainer import grad_checkpoint

        grad_checkpoint(m.model.layers[0])  # recompute layer activations in the backward pass
        print("gradient checkpointing: on")
    settings = loop_settings(cfg, iters, progress)
    return OnlineTrainer(
        settings,
        method_cls(settings),
        m.model,
        m.tokenizer,
        m.reference,
        judge,
        build_optimizer(cfg),
        prompts,
        valid,
        reporting(cfg, training_callback),
        judge_name=cfg.judge,  # named in judge-failure messages
        fingerprint=fingerprint(cfg),
        config=dict(vars(cfg)),
    )

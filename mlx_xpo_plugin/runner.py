"""One run of an online mode, from user settings to saved adapters: what ``TrainMode.main`` does.

Order: resolve and validate every setting, check data and judge (nothing loaded yet), load the
policy (upstream's loader, so LoRA/DoRA/full and quantization behave as in upstream), the
reference (adapters off, or a frozen model), the judge, the prompts; train; test; fuse.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Optional

import mlx.core as mx
import mlx.optimizers as optim

from . import config as C
from .checkpoint import save_json
from .errors import ConfigError
from .fast_blas import banner_line as blas_line
from .judges.base import JudgeContext
from .rollout import SamplingConfig
from .trainer import LoopSettings, OnlineTrainer


def plan_steps(cfg, n_prompts: int, world: int = 1) -> tuple[int, int, int]:
    """(optimizer steps, steps per epoch, prompts per step) of a run: every process of an
    ``mlx.launch`` group takes its own ``batch_size * gradient_accumulation_steps`` prompts of
    each step, so an epoch of ``n_prompts`` takes ceil(n_prompts / (that * world)) steps."""
    per_step = cfg.batch_size * cfg.gradient_accumulation_steps * max(1, world)
    steps_per_epoch = max(1, math.ceil(n_prompts / per_step))
    return cfg.iters or (cfg.epochs or 1) * steps_per_epoch, steps_per_epoch, per_step


def err(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)


def resolve_local_model(setting: str, path: str) -> str:
    """A local folder, or a hub id already in the local cache; never downloads."""
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise ConfigError(setting, path, "is a file; expected a model folder (config.json, *.safetensors)")
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(path, local_files_only=True)
    except Exception:
        raise ConfigError(setting, path, "not a local model folder and not in the local Hugging Face "
                          "cache; this plugin does not download models",
                          "download it first (e.g. `hf download " + path + "`) or give a local path")


def loop_settings(cfg, iters: int, progress: bool = True) -> LoopSettings:
    return LoopSettings(
        mode=cfg.train_mode, iters=iters, batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        micro_batch_size=cfg.micro_batch_size, beta=cfg.beta,
        alpha=cfg.alpha if cfg.train_mode == "xpo" else 0.0,
        xpo_bonus=cfg.xpo_bonus, loss_type=cfg.dpo_cpo_loss_type, delta=cfg.delta,
        sampling=SamplingConfig(max_tokens=cfg.max_completion_length, temperature=cfg.temperature,
                                top_p=cfg.top_p, top_k=cfg.top_k, min_p=cfg.min_p),
        missing_eos_penalty=cfg.missing_eos_penalty, entropy_coef=cfg.entropy_coef,
        steps_per_report=cfg.steps_per_report, steps_per_eval=cfg.steps_per_eval,
        val_batches=cfg.val_batches, save_every=cfg.save_every,
        log_completions_every=cfg.log_completions_every,
        max_nonfinite_steps=cfg.max_nonfinite_steps, seed=cfg.seed,
        adapter_path=cfg.adapter_path, progress=progress,
    )


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


def preflight(cfg) -> None:
    """Every check that needs no model: data files, model paths, judge, resume file."""
    from .data import check_data
    from .registry import check_judge
    if cfg.train_type == "full" and quantization(cfg):
        raise ConfigError("train_type", "full", "a quantized base cannot be fully fine-tuned; use lora or dora")
    n_train = check_data(cfg.data, need_train=cfg.train, need_test=cfg.test)
    per_step = cfg.batch_size * cfg.gradient_accumulation_steps
    if cfg.train and per_step > n_train:
        raise ConfigError("batch_size", cfg.batch_size, f"batch_size x gradient_accumulation_steps "
                          f"({per_step}) is larger than the {n_train} training prompts")
    resolve_local_model("model", cfg.model)
    if cfg.reference_model_path:
        resolve_local_model("reference_model_path", cfg.reference_model_path)
    check_judge(cfg.judge, JudgeContext(cfg.judge_system, dict(cfg.judge_config),
                                        reference_model_path=cfg.reference_model_path, seed=cfg.seed))
    if cfg.resume_adapter_file:
        from .checkpoint_state import check_resume
        check_resume(cfg.resume_adapter_file, cfg)


def _adopt_adapter_config(cfg) -> None:
    """For a test-only run: take train_type / lora_parameters / num_layers from the adapters' config."""
    import json
    path = os.path.join(cfg.adapter_path, "adapter_config.json")
    if os.path.isfile(path):
        with open(path) as f:
            ac = json.load(f)
        cfg.train_type = ac.get("fine_tune_type", cfg.train_type)
        cfg.lora_parameters = ac.get("lora_parameters", cfg.lora_parameters)
        cfg.num_layers = ac.get("num_layers", cfg.num_layers)


def lora_parameters(cfg) -> dict:
    """rank / dropout / scale: the user's values over the defaults."""
    return dict(C.SETTINGS["lora_parameters"].default, **(cfg.lora_parameters or {}))


def write_adapter_config(cfg) -> None:
    """adapter_config.json in the form mlx_lm.load(..., adapter_path=...) reads."""
    lp = lora_parameters(cfg)
    save_json(os.path.join(cfg.adapter_path, "adapter_config.json"), {
        "fine_tune_type": cfg.train_type, "num_layers": cfg.num_layers, "lora_parameters": lp,
        "model": cfg.model, "train_mode": cfg.train_mode,
    })


def _same_model(a: Optional[str], b: Optional[str]) -> bool:
    return bool(a and b) and os.path.realpath(os.path.expanduser(a)) == os.path.realpath(os.path.expanduser(b))


def judge_weights(cfg, model_path: str, model, separate):
    """The already-loaded weights a model judge can share, or None (the judge loads its own).

    judge == reference_model_path: the separate reference; judge == the policy's base model:
    the policy with adapters off (LoRA/DoRA), or the frozen copy loaded for full fine-tuning.
    """
    from .reference import BaseView
    if cfg.reference_model_path and _same_model(cfg.judge, cfg.reference_model_path):
        return separate
    if _same_model(cfg.judge, cfg.model) or _same_model(cfg.judge, model_path):
        if cfg.train_type in ("lora", "dora"):
            return BaseView(model)
        if not cfg.reference_model_path:
            return separate
    return None


def run(cfg, training_callback=None, progress: bool = True) -> int:
    """Run a resolved config (see config.resolve). Returns the exit status."""
    from mlx_lm import load as mlx_load
    from mlx_lm_lora.utils import from_pretrained

    from .checkpoint_state import fingerprint, load_resume
    from .data import load_prompts
    from .precision import apply as set_precision, restore_storage
    from .reference import Reference
    from .registry import build_judge

    preflight(cfg)
    if mx.distributed.init().rank() != 0:  # data parallel: only rank 0 prints and writes
        sys.stdout = open(os.devnull, "w")
    mx.random.seed(cfg.seed)
    blas = blas_line()  # which BLAS MLX multiplies with (Linux CPUs; see fast_blas)
    if blas:
        print(blas)
    model_path = resolve_local_model("model", cfg.model)
    trained = os.path.join(cfg.adapter_path, "adapters.safetensors")
    if not cfg.train and os.path.isfile(trained):
        _adopt_adapter_config(cfg)  # evaluate adapters as they were trained
    lora = None
    if cfg.train_type in ("lora", "dora"):
        lora = {**lora_parameters(cfg), "use_dora": cfg.train_type == "dora", "num_layers": cfg.num_layers}
    model, tokenizer, _ = from_pretrained(model=model_path, new_adapter_path=cfg.adapter_path if cfg.train else None,
                                          lora_config=lora, quantized_load=quantization(cfg))
    if cfg.train:
        write_adapter_config(cfg)
    elif os.path.isfile(trained):
        model.load_weights(trained, strict=False)
        print(f"adapters: loaded {trained}")
    # after every check of the loaded checkpoint (a quantized base refuses train_type full): the
    # dequantized layers stay frozen, as quantized ones are
    precision = set_precision(model, cfg.compute_dtype, "policy", keep_original=cfg.fuse and cfg.train)
    separate = None
    if cfg.reference_model_path or cfg.train_type == "full":
        separate, _ = mlx_load(resolve_local_model("reference_model_path", cfg.reference_model_path or model_path))
        set_precision(separate, cfg.compute_dtype, "reference")
        separate.freeze()
        print(f"reference: frozen model from {cfg.reference_model_path or model_path}")
    else:
        print("reference: the base weights with adapters switched off (no second copy)")
    reference = Reference(model, separate)
    shared = judge_weights(cfg, model_path, model, separate)
    if shared is not None:
        print("judge: shares the reference's weights (no extra copy)")
    judge = build_judge(cfg.judge, JudgeContext(
        cfg.judge_system, dict(cfg.judge_config),
        reference_model=shared, reference_tokenizer=tokenizer if shared is not None else None,
        reference_model_path=cfg.judge if shared is not None else cfg.reference_model_path, seed=cfg.seed,
        compute_dtype=cfg.compute_dtype))
    if cfg.grad_checkpoint and cfg.train:
        from mlx_lm.tuner.trainer import grad_checkpoint
        grad_checkpoint(model.layers[0])  # recompute layer activations in the backward pass
        print("gradient checkpointing: on")

    max_prompt = cfg.max_seq_length - cfg.max_completion_length
    train_set = load_prompts(cfg.data, "train", tokenizer, max_prompt) if cfg.train else None
    valid_set = load_prompts(cfg.data, "valid", tokenizer, max_prompt, required=False) if cfg.train else None
    status = 0
    trainer = None
    if cfg.train:
        iters, steps_per_epoch, per_step = plan_steps(cfg, len(train_set), mx.distributed.init().size())
        opt = build_optimizer(cfg)
        trainer = OnlineTrainer(loop_settings(cfg, iters, progress), model, tokenizer, reference, judge,
                                opt, train_set, valid_set, training_callback)
        trainer.fingerprint = fingerprint(cfg)
        trainer.resolved_config = {k: v for k, v in vars(cfg).items()}
        resume = load_resume(cfg.resume_adapter_file, cfg) if cfg.resume_adapter_file else None
        print(f"training {iters} steps ({steps_per_epoch} per epoch, {per_step} prompts per step, "
              f"2 completions each)")
        result = trainer.train(resume)
        out = cfg.adapter_path
        print(f"adapters: {os.path.join(out, 'adapters.safetensors')}")
        print(f"metrics:  {os.path.join(out, 'metrics.jsonl')}   samples: {os.path.join(out, 'completions.jsonl')}")
        if result["interrupted"] or result["stop_reason"]:
            why = result["stop_reason"] or "interrupted"
            print(f"stopped at step {result['step']} of {iters}: {why}; checkpoint saved.")
            print(f"resume with: mlx_lm_lora.train --train-mode {cfg.train_mode} "
                  f"{'--config ' + cfg.config + ' ' if cfg.config else ''}--resume-adapter-file {out}")
            status = 130 if result["interrupted"] else (0 if "judge" in why else 1)
    if cfg.test and status == 0:
        test_set = load_prompts(cfg.data, "test", tokenizer, max_prompt)
        if trainer is None:
            trainer = OnlineTrainer(loop_settings(cfg, 1, progress), model, tokenizer, reference, judge,
                                    build_optimizer(cfg), test_set, None, training_callback)
        res = trainer.evaluate(test_set, cfg.test_batches)
        save_json(os.path.join(cfg.adapter_path, "test_metrics.json"), res)
        print("test: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in res.items()))
    if cfg.fuse and cfg.train and status == 0:
        from mlx_lm_lora.utils import save_pretrained_merged
        restore_storage(model, precision)  # the fused model is stored as the checkpoint was
        save_pretrained_merged(model=model, tokenizer=tokenizer, save_path=os.path.join(cfg.adapter_path, "fused"),
                               de_quantize=quantization(cfg) is None)
        print(f"fused model: {os.path.join(cfg.adapter_path, 'fused')}")
    if hasattr(judge, "close"):
        judge.close()
    return status


def mode_main(mode_name: str):
    """The ``TrainMode.main`` of an online mode: (args namespace, explicit keys) -> exit status."""

    def main(args, explicit: set, training_callback=None) -> int:
        try:  # both host paths print mode.banner() before calling this
            cli = dict(vars(args)) if not isinstance(args, dict) else dict(args)
            cfg = C.resolve(mode_name, cli, set(explicit), C.load_yaml(cli.get("config")))
            return run(cfg, training_callback)
        except ConfigError as e:
            err(str(e))
            return 2
        except KeyboardInterrupt:  # Ctrl-C outside the training loop (loading, test, fuse)
            err("interrupted")
            return 130

    main.__name__ = f"{mode_name}_main"
    return main

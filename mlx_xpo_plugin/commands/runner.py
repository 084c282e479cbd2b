"""One run of an online mode, from user settings to saved adapters: what ``TrainMode.main`` does.

Order: resolve and validate every setting, check data and judge (nothing loaded yet), load the
policy (upstream's loader, so LoRA/DoRA/full and quantization behave as in upstream), the
reference (adapters off, or a frozen model), the judge, the prompts; train; test; fuse.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import sys
from typing import Optional

import mlx.core as mx
import mlx.optimizers as optim

from mlx_xpo_plugin import config
from mlx_xpo_plugin.commands import prior_run
from mlx_xpo_plugin.commands.hints import command, ignored_judge_system, kernel_note, verbose
from mlx_xpo_plugin.commands.peers import peer_errors, peer_run
from mlx_xpo_plugin.commands.run_lock import check_free, check_writable, created, hold
from mlx_xpo_plugin.compute.models import model_folder, same_folder
from mlx_xpo_plugin.compute.quantized import folder_quantization, quantized_layers, refuse_full
from mlx_xpo_plugin.contracts import JudgeContext, as_judge
from mlx_xpo_plugin.errors import ConfigError, SaveFailed
from mlx_xpo_plugin.host.fast_blas import banner_line as blas_line
from mlx_xpo_plugin.loop.atomic import save_json
from mlx_xpo_plugin.loop.faults import EXIT_JUDGE, EXIT_PEER, JudgeFailure, PeerLost, intact_checkpoint
from mlx_xpo_plugin.loop.settings import from_config as loop_settings
from mlx_xpo_plugin.loop.trainer import OnlineTrainer


def plan_steps(cfg, n_prompts: int, world: int = 1) -> tuple[int, int, int]:
    """(optimizer steps, steps per epoch, prompts per step) of a run: every process of an
    ``mlx.launch`` group takes its own ``batch_size * gradient_accumulation_steps`` prompts of
    each step, so an epoch of ``n_prompts`` takes ceil(n_prompts / (that * world)) steps."""
    per_step = cfg.batch_size * cfg.gradient_accumulation_steps * max(1, world)
    steps_per_epoch = max(1, math.ceil(n_prompts / per_step))
    return cfg.iters or (cfg.epochs or 1) * steps_per_epoch, steps_per_epoch, per_step


def err(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)


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
    """Every check that needs no model: data files, model paths, judge, resume file, output folder."""
    from mlx_xpo_plugin.commands.data import check_data
    from mlx_xpo_plugin.host.registry import check_judge

    if cfg.train:
        check_writable("adapter_path", cfg.adapter_path)
        check_free("adapter_path", cfg.adapter_path)  # a run training there now is named first
        prior_run.check(cfg, resume_command)  # another run's files there: refused, named
    if cfg.train_type == "full" and quantization(cfg):
        raise ConfigError("train_type", "full", "a quantized base cannot be fully fine-tuned; use lora or dora")
    n_train = check_data(cfg.data, need_train=cfg.train, need_test=cfg.test)
    per_step = cfg.batch_size * cfg.gradient_accumulation_steps
    if cfg.train and per_step > n_train:
        raise ConfigError(
            "batch_size",
            cfg.batch_size,
            f"batch_size x gradient_accumulation_steps ({per_step}) is larger than the {n_train} training prompts",
        )
    model_dir = model_folder("model", cfg.model)
    if cfg.train and cfg.train_type == "full":
        q = folder_quantization(model_dir)  # the folder says so: refused before loading it
        if q:
            raise refuse_full(cfg.model, q)
    if cfg.reference_model_path:
        model_folder("reference_model_path", cfg.reference_model_path)
    factory = check_judge(
        cfg.judge,
        JudgeContext(
            cfg.judge_system, dict(cfg.judge_config), reference_model_path=cfg.reference_model_path, seed=cfg.seed
        ),
    )
    note = ignored_judge_system(cfg.judge_system, factory)
    if note:
        print(note, file=sys.stderr)
    if cfg.resume_adapter_file:
        from mlx_xpo_plugin.loop.checkpoints import check_resume

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
    return dict(config.SETTINGS["lora_parameters"].default, **(cfg.lora_parameters or {}))


def write_adapter_config(cfg) -> None:
    """adapter_config.json in the form mlx_lm.load(..., adapter_path=...) reads."""
    lp = lora_parameters(cfg)
    save_json(
        os.path.join(cfg.adapter_path, "adapter_config.json"),
        {
            "fine_tune_type": cfg.train_type,
            "num_layers": cfg.num_layers,
            "lora_parameters": lp,
            "model": cfg.model,
            "train_mode": cfg.train_mode,
        },
    )


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


def resume_command(cfg) -> str:
    return (
        f"{command('mlx_lm_lora.train')} --train-mode {cfg.train_mode} "
        f"{'--config ' + cfg.config + ' ' if cfg.config else ''}--resume-adapter-file {cfg.adapter_path}"
    )


def run(cfg, method_cls, training_callback=None, progress: bool = True) -> int:
    """Run a resolved config (see config.resolve) with a method (online_dpo_trainer.OnlineDPO,
    xpo_trainer.XPO). Returns the exit status. Nothing is written before every check that needs
    no model has passed; a refusal after loading removes the folder it created."""
    preflight(cfg)
    rank = mx.distributed.init().rank()  # under mlx.launch: every process has passed its preflight
    if rank != 0:  # data parallel: only rank 0 prints and writes
        sys.stdout = open(os.devnull, "w")
        return peer_run(cfg, rank, lambda: _run(cfg, method_cls, training_callback, progress))
    if not cfg.train:
        return _run(cfg, method_cls, training_callback, progress)
    with created(cfg.adapter_path), hold("adapter_path", cfg.adapter_path):  # one run per adapter_path
        return _run(cfg, method_cls, training_callback, progress)


def _run(cfg, method_cls, training_callback, progress: bool) -> int:
    from mlx_lm import load as mlx_load
    from mlx_lm_lora.utils import from_pretrained

    from mlx_xpo_plugin.commands.data import load_prompts
    from mlx_xpo_plugin.compute.precision import apply as set_precision
    from mlx_xpo_plugin.compute.precision import restore_storage
    from mlx_xpo_plugin.compute.reference import Reference
    from mlx_xpo_plugin.host.registry import build_judge
    from mlx_xpo_plugin.loop.checkpoints import fingerprint, load_resume

    loud = verbose()
    mx.random.seed(cfg.seed)
    blas = blas_line()  # which BLAS MLX multiplies with (Linux CPUs; see fast_blas)
    if blas:
        print(blas)
    note = kernel_note()
    if note:
        print(note)
    model_path = model_folder("model", cfg.model)
    trained = os.path.join(cfg.adapter_path, "adapters.safetensors")
    if not cfg.train and os.path.isfile(trained):
        _adopt_adapter_config(cfg)  # evaluate adapters as they were trained
    lora = None
    if cfg.train_type in ("lora", "dora"):
        lora = {**lora_parameters(cfg), "use_dora": cfg.train_type == "dora", "num_layers": cfg.num_layers}
    with contextlib.nullcontext() if loud else contextlib.redirect_stdout(io.StringIO()):  # upstream's "Loading ..."
        model, tokenizer, _ = from_pretrained(
            model=model_path,
            new_adapter_path=None,  # nothing written while loading: adapter_config.json comes in begin_writing
            lora_config=lora,
            quantized_load=quantization(cfg),
        )
    if cfg.train and cfg.train_type == "full" and quantized_layers(model):  # the loaded model decides
        q = quantized_layers(model)
        raise refuse_full(cfg.model, f"{len(q)} quantized layers, e.g. {q[0]}")
    if not cfg.train and os.path.isfile(trained):
        model.load_weights(trained, strict=False)
        print(f"adapters: loaded {trained}")
    # after every check of the loaded checkpoint (a quantized base refuses train_type full): the
    # dequantized layers stay frozen, as quantized ones are
    precision = set_precision(model, cfg.compute_dtype, "policy", keep_original=cfg.fuse and cfg.train)
    separate = None
    if cfg.reference_model_path or cfg.train_type == "full":
        separate, _ = mlx_load(model_folder("reference_model_path", cfg.reference_model_path or model_path))
        set_precision(separate, cfg.compute_dtype, "reference")
        separate.freeze()
        if loud:
            print(f"reference: frozen model from {cfg.reference_model_path or model_path}")
    elif loud:
        print("reference: the base weights with adapters switched off (no second copy)")
    reference = Reference(model, separate)
    shared = judge_weights(cfg, model_path, model, separate)
    if shared is not None and loud:
        print("judge: shares the reference's weights (no extra copy)")
    judge = as_judge(
        build_judge(
            cfg.judge,
            JudgeContext(
                cfg.judge_system,
                dict(cfg.judge_config),
                reference_model=shared,
                reference_tokenizer=tokenizer if shared is not None else None,
                reference_model_path=cfg.judge if shared is not None else cfg.reference_model_path,
                seed=cfg.seed,
                compute_dtype=cfg.compute_dtype,
            ),
        )
    )
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
        settings = loop_settings(cfg, iters, progress)
        trainer = OnlineTrainer(
            settings,
            method_cls(settings),
            model,
            tokenizer,
            reference,
            judge,
            opt,
            train_set,
            valid_set,
            training_callback,
        )
        trainer.fingerprint = fingerprint(cfg)
        trainer.judge.name = cfg.judge  # named in judge-failure messages
        trainer.resolved_config = {k: v for k, v in vars(cfg).items()}
        resume = load_resume(cfg.resume_adapter_file, cfg) if cfg.resume_adapter_file else None
        begin_writing(cfg, resume)
        print(f"training {iters} steps ({steps_per_epoch} per epoch, {per_step} prompts per step, 2 completions each)")
        if resume:
            print(f"resuming from step {resume['step']} of {iters}")
        try:
            result = trainer.train(resume)
        except SaveFailed as e:  # disk full / unwritable during a save: the last checkpoint is kept
            err(f"{e}; {intact_checkpoint(cfg.adapter_path)}")
            print(f"resume with: {resume_command(cfg)}")
            return e.exit_status
        except PeerLost as e:  # data parallel: nothing saved for the step in progress
            why = "; ".join(peer_errors(cfg.adapter_path)) or str(e)
            then = f"resume with: mlx.launch <the same options> {resume_command(cfg)}"
            err(f"{why}; {intact_checkpoint(cfg.adapter_path, then)}")  # one line
            return EXIT_PEER
        out = cfg.adapter_path
        if result["updates"]:
            print(f"adapters: {os.path.join(out, 'adapters.safetensors')}")
        print(f"metrics:  {os.path.join(out, 'metrics.jsonl')}   samples: {os.path.join(out, 'completions.jsonl')}")
        if result["interrupted"] or result["stop_reason"]:
            why = result["stop_reason"] or "interrupted"
            saved = f"checkpoint of step {result['step']} saved"
            print(f"stopped at step {result['stopped_at']} of {iters}: {why}; {saved}.")
            print(f"resume with: {resume_command(cfg)}")
            status = (
                130
                if result["interrupted"]
                else trainer.guard.status
                if trainer.guard.status
                else 0
                if "judge" in why
                else 1
            )  # exit statuses: README, "Faults"
        if not result["updates"]:  # never a success, and the adapters are not presented as trained
            status = status or (EXIT_JUDGE if trainer.guard.judgeless else 1)
            err(
                f"no step of this run made an update ({trainer.guard.judgeless} of {result['stopped_at']} steps "
                f"without a valid pair): the adapters in {out} are untrained"
            )
    if cfg.test and status == 0:
        test_set = load_prompts(cfg.data, "test", tokenizer, max_prompt)
        if trainer is None:
            settings = loop_settings(cfg, 1, progress)
            trainer = OnlineTrainer(
                settings,
                method_cls(settings),
                model,
                tokenizer,
                reference,
                judge,
                build_optimizer(cfg),
                test_set,
                None,
                training_callback,
            )
            trainer.judge.name = cfg.judge
        res = trainer.evaluate(test_set, cfg.test_batches)
        prior_run.keep_previous(os.path.join(cfg.adapter_path, "test_metrics.json"))
        save_json(os.path.join(cfg.adapter_path, "test_metrics.json"), res)
        print("test: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in res.items()))
    if cfg.fuse and cfg.train and status == 0:
        from mlx_lm_lora.utils import save_pretrained_merged

        restore_storage(model, precision)  # the fused model is stored as the checkpoint was
        fused = os.path.join(cfg.adapter_path, "fused")
        save_pretrained_merged(
            model=model, tokenizer=tokenizer, save_path=fused + ".partial", de_quantize=quantization(cfg) is None
        )
        replaced = prior_run.replace_folder(fused + ".partial", fused)
        print(f"fused model: {fused}" + (" (replaced the one fused before this resumed run)" if replaced else ""))
    judge.close()
    return status


def begin_writing(cfg, resume) -> None:
    """The first writes of a training run, after every refusal: move another run's files aside
    (start_over), drop what a resumed run redoes, write adapter_config.json."""
    if cfg.start_over and not prior_run.resumes_here(cfg):
        moved = prior_run.move_aside(cfg.adapter_path)
        if moved:
            print(f"start_over: the previous run's files were moved to {moved}")
    if resume:
        dropped = prior_run.drop_copies_after(cfg.adapter_path, int(resume["step"]))
        if dropped:
            print(
                f"resume: removed {len(dropped)} periodic adapter copies of steps after {resume['step']} "
                f"({', '.join(dropped)}): this run redoes those steps"
            )
    write_adapter_config(cfg)


def mode_main(method_cls):
    """The ``TrainMode.main`` of an online method: (args namespace, explicit keys) -> exit status."""
    mode_name = method_cls.mode

    def main(args, explicit: set, training_callback=None) -> int:
        try:  # both host paths print mode.banner() before calling this
            cli = dict(vars(args)) if not isinstance(args, dict) else dict(args)
            cfg = config.resolve(mode_name, cli, set(explicit), config.load_yaml(cli.get("config")))
            return run(cfg, method_cls, training_callback)
        except ConfigError as e:
            err(str(e))
            return e.exit_status
        except JudgeFailure as e:  # the judge raised outside training (the test phase)
            err(str(e))
            return EXIT_JUDGE
        except KeyboardInterrupt:  # Ctrl-C outside the training loop (loading, test, fuse)
            err("interrupted")
            return 130

    main.__name__ = f"{mode_name}_main"
    return main

"""One run of an online mode, from user settings to saved adapters: what ``TrainMode.main`` does.

The composition root. :func:`preflight` checks every setting that needs no model (nothing is
written); :func:`run` takes the folder and its lock; :func:`_run` is the run's named steps: load
the models, build the judge, build the trainer, train, test, fuse (the parts: build.py).
"""

from __future__ import annotations

import importlib.util
import os
import sys

import mlx.core as mx

from mlx_xpo_plugin import config
from mlx_xpo_plugin.commands import prior_run
from mlx_xpo_plugin.commands.build import (
    build_the_judge,
    build_trainer,
    load_models,
    plan_steps,
    quantization,
    write_adapter_config,
)
from mlx_xpo_plugin.commands.estimate import projection_line
from mlx_xpo_plugin.commands.hints import command, ignored_judge_system, kernel_note, note_unused_upstream
from mlx_xpo_plugin.commands.peers import discard_peer_errors, peer_errors, peer_run
from mlx_xpo_plugin.commands.run_lock import check_free, check_writable, created, hold
from mlx_xpo_plugin.compute.device import wired_limit
from mlx_xpo_plugin.compute.models import model_folder
from mlx_xpo_plugin.compute.quantized import folder_quantization, refuse_full
from mlx_xpo_plugin.contracts import JudgeContext
from mlx_xpo_plugin.errors import ConfigError, SaveFailed
from mlx_xpo_plugin.exits import Exit, of_run
from mlx_xpo_plugin.host.fast_blas import banner_line as blas_line
from mlx_xpo_plugin.loop.atomic import save_json
from mlx_xpo_plugin.loop.faults import JudgeFailure, PeerLost, intact_checkpoint
from mlx_xpo_plugin.loop.win_rate import describe

__all__ = ["mode_main", "plan_steps", "preflight", "resume_command", "run"]


def err(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)


def preflight(cfg) -> None:
    """Every check that needs no model: data files, model paths, judge, resume file, output folder."""
    from mlx_xpo_plugin.commands.data import check_data

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
    check_the_judge(cfg)
    if cfg.wandb and cfg.train and importlib.util.find_spec("wandb") is None:
        raise ConfigError("wandb", cfg.wandb, "reporting to WandB needs the wandb package (pip install wandb)")
    if cfg.resume_adapter_file:
        from mlx_xpo_plugin.loop.checkpoints import check_resume

        check_resume(cfg.resume_adapter_file, cfg)


def check_the_judge(cfg) -> None:
    """The judge's spec and options (nothing loaded); a note when it ignores judge_system."""
    from mlx_xpo_plugin.host.registry import check_judge

    ctx = JudgeContext(
        cfg.judge_system, dict(cfg.judge_config), reference_model_path=cfg.reference_model_path, seed=cfg.seed
    )
    note = ignored_judge_system(cfg.judge_system, check_judge(cfg.judge, ctx))
    if note:
        print(note, file=sys.stderr)


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
    projection = projection_line(cfg, world=mx.distributed.init().size())  # when the run is over a minute
    if projection:
        print(projection)
    with created(cfg.adapter_path), hold("adapter_path", cfg.adapter_path):  # one run per adapter_path
        try:
            return _run(cfg, method_cls, training_callback, progress)
        finally:
            discard_peer_errors(cfg.adapter_path)


@wired_limit()  # as upstream's trainers on Metal; nothing on a CPU
def _run(cfg, method_cls, training_callback, progress: bool) -> int:
    """The steps of a run; returns its exit status (see exits.py)."""
    announce(cfg)
    models = load_models(cfg)
    judge = build_the_judge(cfg, models)
    try:
        trainer = build_trainer(cfg, method_cls, models, judge, training_callback, progress)
        status = train(cfg, trainer) if cfg.train else Exit.DONE
        if cfg.test and status == Exit.DONE:
            status = test(cfg, trainer)
        if cfg.fuse and cfg.train and status == Exit.DONE:
            fuse(cfg, models)
    finally:
        judge.close()
    return status


def announce(cfg) -> None:
    """Seed, and what the run computes with (the BLAS under MLX on Linux CPUs, kernel notes)."""
    mx.random.seed(cfg.seed)
    for line in (blas_line(), kernel_note()):
        if line:
            print(line)


def train(cfg, trainer) -> int:
    """Resume or start, write the run's first files, run the steps; the exit status."""
    from mlx_xpo_plugin.loop.checkpoints import load_resume

    resume = load_resume(cfg.resume_adapter_file, cfg) if cfg.resume_adapter_file else None
    prior_run.begin_writing(cfg, resume)  # the first write of the run
    write_adapter_config(cfg)
    iters, per_epoch, per_step = plan_steps(cfg, len(trainer.train_set), trainer.world)
    print(f"training {iters} steps ({per_epoch} per epoch, {per_step} prompts per step, 2 completions each)")
    if resume:
        print(f"resuming from step {resume['step']} of {iters}")
    try:
        result = trainer.train(resume)
    except SaveFailed as e:  # disk full / unwritable during a save: the last checkpoint is kept
        err(f"{e}; {intact_checkpoint(cfg.adapter_path)}")
        print(f"resume with: {resume_command(cfg)}")
        return Exit.SAVE
    except PeerLost as e:  # data parallel: nothing saved for the step in progress
        why = "; ".join(peer_errors(cfg.adapter_path)) or str(e)
        then = f"resume with: mlx.launch <the same options> {resume_command(cfg)}"
        err(f"{why}; {intact_checkpoint(cfg.adapter_path, then)}")  # one line
        return Exit.PEER
    return report(cfg, trainer, result)


def report(cfg, trainer, result: dict) -> int:
    """Say where the run's files are, how it ended and how to resume; its exit status."""
    out, iters = cfg.adapter_path, trainer.settings.iters
    if result["updates"]:  # adapters without a single update are never presented as trained
        print(f"adapters: {os.path.join(out, 'adapters.safetensors')}")
    print(f"metrics:  {os.path.join(out, 'metrics.jsonl')}   samples: {os.path.join(out, 'completions.jsonl')}")
    if result["interrupted"] or result["stop_reason"]:
        why = result["stop_reason"] or "interrupted"
        saved = f"checkpoint of step {result['step']} saved"
        print(f"stopped at step {result['stopped_at']} of {iters}: {why}; {saved}.")
        print(f"resume with: {resume_command(cfg)}")
    if not result["updates"]:
        err(
            f"no step of this run made an update ({trainer.guard.judgeless} of {result['stopped_at']} steps "
            f"without a valid pair): the adapters in {out} are untrained"
        )
    return of_run(result, trainer.guard.status, trainer.guard.judgeless)


def test(cfg, trainer) -> int:
    """Win-rate against the reference on the test prompts -> test_metrics.json (the previous
    result is kept under its date); a judge that failed on every pair gives no result (JUDGE)."""
    from mlx_xpo_plugin.commands.data import load_prompts

    prompts = load_prompts(cfg.data, "test", trainer.tokenizer, cfg.max_seq_length - cfg.max_completion_length)
    before = trainer.judge.errors
    res = trainer.evaluate(prompts, cfg.test_batches)
    failed = trainer.judge.errors - before
    if res["pairs"] and failed >= res["pairs"]:
        err(f"test: the judge {cfg.judge!r} failed on every pair ({failed} errors: {trainer.judge.last_error})")
        return Exit.JUDGE
    path = os.path.join(cfg.adapter_path, "test_metrics.json")
    prior_run.keep_previous(path)
    save_json(path, res)
    print(f"test: win-rate vs reference {describe(res)}; {path}")
    return Exit.DONE


def fuse(cfg, models) -> None:
    """The adapters fused into the base, stored as the checkpoint was, at <adapter_path>/fused
    (written aside, then put in place)."""
    from mlx_lm_lora.utils import save_pretrained_merged

    from mlx_xpo_plugin.compute.precision import restore_storage

    restore_storage(models.model, models.precision)
    fused = os.path.join(cfg.adapter_path, "fused")
    save_pretrained_merged(
        model=models.model,
        tokenizer=models.tokenizer,
        save_path=fused + ".partial",
        de_quantize=quantization(cfg) is None,
    )
    replaced = prior_run.replace_folder(fused + ".partial", fused)
    print(f"fused model: {fused}" + (" (replaced the one fused before this resumed run)" if replaced else ""))


def mode_main(method_cls):
    """The ``TrainMode.main`` of an online method: (args namespace, explicit keys) -> exit status."""
    mode_name = method_cls.mode

    def main(args, explicit: set, training_callback=None) -> int:
        try:  # both host paths print mode.banner() before calling this
            cli = dict(vars(args)) if not isinstance(args, dict) else dict(args)
            yaml_values = config.load_yaml(cli.get("config"))
            cfg = config.resolve(mode_name, cli, set(explicit), yaml_values)
            note_unused_upstream(mode_name, set(yaml_values) | set(explicit))
            return run(cfg, method_cls, training_callback)
        except ConfigError as e:
            err(str(e))
            return Exit.BAD_INPUT
        except JudgeFailure as e:  # the judge raised outside training (the test phase)
            err(str(e))
            return Exit.JUDGE
        except KeyboardInterrupt:  # Ctrl-C outside the training loop (loading, test, fuse)
            err("interrupted")
            return Exit.INTERRUPTED

    main.__name__ = f"{mode_name}_main"
    return main

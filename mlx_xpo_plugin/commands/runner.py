"""One run of an online mode, from user settings to saved adapters: what ``TrainMode.main`` does.

The composition root. :func:`preflight` checks every setting that needs no model (nothing is
written); :func:`run` takes the folder and its lock; :func:`_run` is the run's named steps: load
the models, build the judge, build the trainer, train, test, fuse (the parts: build.py).

Data parallel (``mlx.launch``, hosts that may share no disk): process 0 alone checks, reads and
writes ``adapter_path``; every process checks its own model, data and judge; the processes start
or refuse together (peers.py) and a resume's checkpoint reaches the others from process 0.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Optional

import mlx.core as mx

from mlx_xpo_plugin import config, config_resume
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
from mlx_xpo_plugin.commands.hints import (
    ignored_judge_system,
    kernel_note,
    launched_by,
    note_unused_upstream,
    resume_line,
)
from mlx_xpo_plugin.commands.peers import PeerRefused, discard_peer_errors, peer_errors, peer_run, start_together
from mlx_xpo_plugin.commands.run_lock import check_free, check_writable, created, hold
from mlx_xpo_plugin.compute.device import wired_limit
from mlx_xpo_plugin.compute.models import model_folder
from mlx_xpo_plugin.compute.quantized import folder_quantization, refuse_full
from mlx_xpo_plugin.contracts import JudgeContext
from mlx_xpo_plugin.cpu.fast_blas import banner_line as blas_line
from mlx_xpo_plugin.errors import ConfigError, SaveFailed
from mlx_xpo_plugin.exits import Exit, of_run
from mlx_xpo_plugin.loop.atomic import save_json
from mlx_xpo_plugin.loop.checkpoints import check_resume, read_state
from mlx_xpo_plugin.loop.faults import JudgeFailure, PeerLost, intact_checkpoint
from mlx_xpo_plugin.loop.share import Elsewhere, ignore_sigterm, wait_for_process_0
from mlx_xpo_plugin.loop.win_rate import describe

__all__ = ["mode_main", "plan_steps", "preflight", "resume_command", "run"]


def err(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)


def preflight(cfg) -> list[str]:
    """Every check that needs no model: resume file, output folder, data files, then the model
    paths and the judge (a hub id downloads there, so it comes last); the resume file and the
    output folder on process 0 only (the run's files are on its disk). Returns the settings a
    resumed run changes (config_resume.check), for its first line."""
    from mlx_xpo_plugin.commands.data import check_data

    writer = mx.distributed.init().rank() == 0
    resumed = cfg.resume_adapter_file and writer
    changes = config_resume.check(cfg, *read_state(cfg.resume_adapter_file)) if resumed else []
    if cfg.train and writer:
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
    if cfg.wandb and cfg.train and importlib.util.find_spec("wandb") is None:
        raise ConfigError("wandb", cfg.wandb, "reporting to WandB needs the wandb package (pip install wandb)")
    if resumed:
        check_resume(cfg.resume_adapter_file, cfg)
    model_dir = model_folder("model", cfg.model)  # a hub id downloads here: every cheaper check comes first
    if cfg.train and cfg.train_type == "full":
        q = folder_quantization(model_dir)  # the folder says so: refused before loading it
        if q:
            raise refuse_full(cfg.model, q)
    if cfg.reference_model_path:
        model_folder("reference_model_path", cfg.reference_model_path)
    check_the_judge(cfg)
    return changes


def check_the_judge(cfg) -> None:
    """The judge's spec and options (nothing loaded); a note when it ignores judge_system."""
    from mlx_xpo_plugin.host.registry import check_judge

    ctx = JudgeContext(
        cfg.judge_system, dict(cfg.judge_config), reference_model_path=cfg.reference_model_path, seed=cfg.seed
    )
    note = ignored_judge_system(cfg.judge_system, check_judge(cfg.judge, ctx))
    if note:
        print(note, file=sys.stderr)


def resume_command(cfg, mode: Optional[str] = None, processes: Optional[int] = None) -> str:
    """The line that resumes the run in ``cfg.adapter_path``: this run, or the run of ``mode`` made
    by ``processes`` processes found there; several processes: under mlx.launch as this one was."""
    world = mx.distributed.init().size()
    processes = world if processes is None else processes
    launcher = launched_by() if processes > 1 and processes == world else None
    return resume_line(mode or cfg.train_mode, cfg.adapter_path, processes, launcher)


def run(cfg, method_cls, training_callback=None, progress: bool = True) -> int:
    """Run a resolved config (see config.resolve) with a method (online_dpo_trainer.OnlineDPO,
    xpo_trainer.XPO). Returns the exit status. Nothing is written before every check that needs
    no model has passed; a refusal after loading removes the folder it created."""
    rank = mx.distributed.init().rank()
    if rank != 0:  # data parallel: only process 0 prints, reads and writes the run's files
        sys.stdout = open(os.devnull, "w")
        return peer_run(cfg, rank, lambda: _peer(cfg, method_cls, training_callback))
    try:
        return _run_process_0(cfg, method_cls, training_callback, progress)
    finally:
        ignore_sigterm()  # data parallel: the others end as soon as process 0's connections close


def _run_process_0(cfg, method_cls, training_callback, progress: bool) -> int:
    changes = start_together(lambda: preflight(cfg))
    if not cfg.train:
        return _run(cfg, method_cls, training_callback, progress)
    if changes:
        print("resuming with " + ", ".join(changes))
    projection = projection_line(cfg, world=mx.distributed.init().size())  # when the run is over a minute
    if projection:
        print(projection)
    with created(cfg.adapter_path), hold("adapter_path", cfg.adapter_path):  # one run per adapter_path
        try:
            return _run(cfg, method_cls, training_callback, progress)
        finally:
            discard_peer_errors(cfg.adapter_path)


def _peer(cfg, method_cls, training_callback) -> int:
    """A process other than 0: its checks, then its share of the training (a test-only run's
    evaluation, the test and the fused model are process 0's)."""
    start_together(lambda: preflight(cfg))
    return _run(cfg, method_cls, training_callback, False) if cfg.train else Exit.DONE


@wired_limit()  # as upstream's trainers on Metal; nothing on a CPU
def _run(cfg, method_cls, training_callback, progress: bool) -> int:
    """The steps of a run; returns its exit status (see exits.py)."""
    announce(cfg)
    parts = []  # (models, judge): the judge is closed however the run ends

    def build():
        parts.append(load_models(cfg))
        parts.append(build_the_judge(cfg, parts[0]))
        return build_trainer(cfg, method_cls, *parts, training_callback, progress)

    try:
        trainer = start_together(build) if cfg.train else build()  # data parallel: all loaded, or none starts
        status, moved = train(cfg, trainer) if cfg.train else (Exit.DONE, [])
        if trainer.rank != 0:
            return status
        if cfg.test and status == Exit.DONE:
            status = test(cfg, trainer)
        if cfg.fuse and cfg.train and status == Exit.DONE:
            fuse(cfg, parts[0])
        if "training.png" in moved and status == Exit.DONE:
            plot_again(cfg)
    finally:
        if len(parts) > 1:
            parts[1].close()
    return status


def announce(cfg) -> None:
    """Seed, and what the run computes with (the BLAS under MLX on Linux CPUs, kernel notes)."""
    mx.random.seed(cfg.seed)
    for line in (blas_line(), kernel_note()):
        if line:
            print(line)


def train(cfg, trainer) -> tuple[int, list]:
    """Resume or start, write the run's first files, run the steps; the exit status and the
    earlier part's results a resume moved aside (prior_run.RESULTS)."""
    from mlx_xpo_plugin.loop.checkpoints import load_resume

    resume = load_resume(cfg.resume_adapter_file, cfg) if cfg.resume_adapter_file else None  # every process
    moved = prior_run.begin_writing(cfg, resume) if trainer.rank == 0 else []  # the first write of the run
    if trainer.rank == 0:
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
        return Exit.SAVE, moved
    except PeerLost as e:  # data parallel: nothing saved for the step in progress
        if trainer.rank != 0:
            raise  # said by peers.peer_run
        why = "; ".join(peer_errors(cfg.adapter_path)) or str(e)
        then = f"resume with: {resume_command(cfg)}"
        err(f"{why}; {intact_checkpoint(cfg.adapter_path, then)}")  # one line
        return Exit.PEER, moved
    return report(cfg, trainer, result), moved


def report(cfg, trainer, result: dict) -> int:
    """Say where the run's files are, how it ended and how to resume; its exit status."""
    out, iters = cfg.adapter_path, trainer.settings.iters
    if result["updates"]:  # adapters without a single update are never presented as trained
        print(f"adapters: {os.path.join(out, 'adapters.safetensors')}")
    written = [(k, os.path.join(out, f)) for k, f in (("metrics", "metrics.jsonl"), ("samples", "completions.jsonl"))]
    written = [f"{k}: {p}" for k, p in written if os.path.isfile(p)]  # only files that exist
    if written:
        print("   ".join(written))
    if result["interrupted"] or result["stop_reason"]:
        why = result["stop_reason"] or "interrupted"
        saved = f"checkpoint of step {result['step']} saved"
        print(f"stopped at step {result['stopped_at']} of {iters}: {why}; {saved}.")
        print(f"resume with: {resume_command(cfg)}")
    if not result["updates"]:
        last = getattr(trainer.judge, "last_invalid", None)  # why the judge's answers were not verdicts
        err(
            f"no step of this run made an update ({trainer.guard.judgeless} of {result['stopped_at']} steps "
            f"without a valid pair): the adapters in {out} are untrained"
            + (f"; the judge's last invalid answer: {last}" if last else "")
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
    print(f"fused model: {fused}" + (" (replaced the one fused before)" if replaced else ""))


def plot_again(cfg) -> None:
    """The training curves of the whole run, where a resume moved the earlier part's plot aside."""
    from mlx_xpo_plugin.commands.plot import write_plot  # here: matplotlib, only for this

    print(f"plot: {write_plot(cfg.adapter_path)} (made again for the whole run)")


def mode_main(method_cls):
    """The ``TrainMode.main`` of an online method: (args namespace, explicit keys) -> exit status."""
    mode_name = method_cls.mode

    def main(args, explicit: set, training_callback=None) -> int:
        try:  # both host paths name the plugin that runs the mode before calling this
            cli = dict(vars(args)) if not isinstance(args, dict) else dict(args)
            yaml_values = config.load_yaml(cli.get("config"))
            cfg = config_resume.resolve_run(mode_name, cli, set(explicit), yaml_values)
            note_unused_upstream(mode_name, set(yaml_values) | set(explicit))
            return run(cfg, method_cls, training_callback)
        except ConfigError as e:
            err(str(e))
            return Exit.BAD_INPUT
        except PeerRefused as e:  # data parallel: another process refused to start
            err(str(e))
            return e.exit_status
        except Elsewhere as e:  # data parallel: process 0 says why (a read shared before run())
            wait_for_process_0()
            return e.exit_status
        except JudgeFailure as e:  # the judge raised outside training (the test phase)
            err(str(e))
            return Exit.JUDGE
        except KeyboardInterrupt:  # Ctrl-C outside the training loop (loading, test, fuse)
            err("interrupted")
            return Exit.INTERRUPTED

    main.__name__ = f"{mode_name}_main"
    return main

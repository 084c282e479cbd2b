"""Resumable checkpoints of the online loop.

<adapter_path>/adapters.safetensors          the current adapters (what mlx_lm loads)
<adapter_path>/NNNNNNN_adapters.safetensors  a copy every save_every steps
<adapter_path>/checkpoint/adapters-NNNNNNN.safetensors, optimizer-NNNNNNN.safetensors, state.json
    adapters and optimizer state (each tagged with its step), step, data-order position (sampling
    is reseeded from (seed, step) every step), schedule position, the judge's state, the config

state.json is written last and names the arrays files of its step (older checkpoints: the
unnumbered names); the previous step's files are removed only after it is written. So a run
killed, or a disk that fills up, anywhere during a save leaves the previous checkpoint complete.
Every file is written atomically (temporary file, then rename); a failed write raises SaveFailed.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any

import mlx.core as mx
from mlx.utils import tree_unflatten

from mlx_xpo_plugin.config import SETTINGS
from mlx_xpo_plugin.errors import ConfigError, SaveFailed
from mlx_xpo_plugin.loop import atomic as ckpt
from mlx_xpo_plugin.loop.faults import capture
from mlx_xpo_plugin.loop.faults import restore as restore_judge
from mlx_xpo_plugin.loop.share import arrays_from_rank0, from_rank0

#: settings that must match for a checkpoint to be resumed: those the settings table marks
#: ``on_resume="same"`` (config.py; the other rules are applied by config_resume.py)
FINGERPRINT_KEYS = tuple(name for name, s in SETTINGS.items() if s.on_resume == "same")


@dataclass
class LoopState:
    """What a resumed run needs besides the adapters and the optimizer state (data order and
    sampling are functions of the seed, the position and the step)."""

    step: int = 0  # optimizer steps done
    position: int = 0  # prompts consumed, all processes together
    nonfinite_run: int = 0  # consecutive steps with a non-finite loss
    updates: int = 0  # optimizer updates made (steps without a valid pair or finite loss make none)
    judge_state: Any = None  # the judge's get_state(), where it has internal randomness

    def set(self, other: "LoopState") -> None:
        """Take ``other``'s values in place (the data order reads this object's position)."""
        self.__dict__.update(asdict(other))


def fingerprint(cfg) -> dict:
    """The settings a resumed run must share with its checkpoint, and its number of processes
    (``mlx.launch -n``): like batch_size, it decides the prompts of each step and the step count."""
    return {**{k: getattr(cfg, k, None) for k in FINGERPRINT_KEYS}, "processes": mx.distributed.init().size()}


def _other_processes(theirs: int, mine: int) -> str:
    how = "without mlx.launch" if theirs == 1 else f"under mlx.launch -n {theirs}"
    return (
        f"the checkpoint was made by {theirs} process{'es' * (theirs != 1)}, this run has {mine}: resume it "
        f"{how} (the prompts of each step and the number of steps depend on it)"
    )


def save_checkpoint(trainer, final: bool = False) -> None:
    s = trainer.settings
    try:
        _save(trainer, final)
    except OSError as e:  # disk full, unwritable folder: the previous checkpoint is untouched
        _remove_unreferenced(os.path.join(s.adapter_path, "checkpoint"))  # frees the space it took
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        raise SaveFailed(
            f"saving the checkpoint of step {trainer.step} failed: {e.strerror or e}{where}",
            os.path.join(s.adapter_path, "checkpoint"),
        ) from e


def _save(trainer, final: bool) -> None:
    s = trainer.settings
    d = os.path.join(s.adapter_path, "checkpoint")
    os.makedirs(d, exist_ok=True)
    weights = ckpt.trainable_weights(trainer.model)
    ckpt.save_arrays(os.path.join(s.adapter_path, "adapters.safetensors"), weights)
    if not final:
        ckpt.save_arrays(os.path.join(s.adapter_path, f"{trainer.step:07d}_adapters.safetensors"), weights)
    tag = {"step": str(trainer.step)}
    files = {name: f"{name}-{trainer.step:07d}.safetensors" for name in ("adapters", "optimizer")}
    ckpt.save_arrays(os.path.join(d, files["adapters"]), weights, tag)
    ckpt.save_arrays(os.path.join(d, files["optimizer"]), ckpt.optimizer_arrays(trainer.opt), tag)
    trainer.state.judge_state = capture(trainer.judge)  # its declared state and the global random states
    beta, alpha = trainer.schedule()
    state = {
        "format": 1,
        **asdict(trainer.state),
        "iters": s.iters,
        "epoch": trainer.order.epoch,
        "alpha": alpha,
        "beta": beta,
        "final": final,
        "fingerprint": trainer.fingerprint,
        "config": trainer.config,
        "files": files,
    }
    ckpt.save_json(os.path.join(d, "state.json"), state)  # the commit point
    _remove_unreferenced(d)  # only now are the files of the previous checkpoint unused


def _remove_unreferenced(d: str) -> None:
    """Remove the arrays files in ``d`` that its state.json does not name (best effort)."""
    try:
        with open(os.path.join(d, "state.json")) as f:
            keep = set((json.load(f).get("files") or {}).values())
        for name in os.listdir(d):
            if name.endswith(".safetensors") and keep and name not in keep:
                os.remove(os.path.join(d, name))
    except (OSError, ValueError):
        pass


def find_checkpoint(path: str) -> str:
    """Accept the adapter folder, its checkpoint/ folder, state.json or adapters.safetensors."""
    p = os.path.abspath(path)
    candidates = [p, os.path.join(p, "checkpoint"), os.path.join(os.path.dirname(p), "checkpoint")]
    if os.path.basename(p) == "state.json":
        candidates.insert(0, os.path.dirname(p))
    for c in candidates:
        if os.path.isfile(os.path.join(c, "state.json")):
            return c
    raise ConfigError(
        "resume_adapter_file",
        path,
        "no checkpoint found there (expected <adapter_path>/checkpoint/state.json written by an xpo/online_dpo run)",
    )


def read_state(path: str) -> tuple[str, dict]:
    """The checkpoint folder that ``path`` names and its state.json: the step, the run's resolved
    settings ("config": the base of a resumed run's settings, config_resume.py), the fingerprint.
    The one place that reads it; cheap enough to run before any model is loaded."""
    d = find_checkpoint(path)
    try:
        with open(os.path.join(d, "state.json")) as f:
            state = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError("resume_adapter_file", path, f"its checkpoint/state.json cannot be read ({e})")
    if not isinstance(state, dict):
        raise ConfigError("resume_adapter_file", path, "its checkpoint/state.json is not a checkpoint's state")
    return d, state


def check_resume(path: str, cfg) -> tuple[str, dict]:
    """Find a checkpoint and check that it belongs to this run's mode, model and config
    (reads state.json only: cheap enough to run before any model is loaded)."""
    d, state = read_state(path)
    mine = fingerprint(cfg)
    theirs = state.get("fingerprint") or {}
    diff = [k for k in mine if k in theirs and theirs[k] != mine[k]]  # older checkpoints lack "processes"
    if diff:
        k = diff[0]
        if k == "processes":
            raise ConfigError("resume_adapter_file", path, _other_processes(theirs[k], mine[k]))
        raise ConfigError(
            "resume_adapter_file", path, f"the checkpoint was made with {k}={theirs[k]!r}, this run has {k}={mine[k]!r}"
        )
    return d, state


def load_resume(path: str, cfg) -> dict:
    """The checked checkpoint with its optimizer state and adapters. Data parallel: read and
    checked by process 0 alone (the checkpoint is on its disk), then sent to every process
    (share.py); a refusal is process 0's, and every process stops with it."""
    held = {}

    def read() -> dict:
        d, state = check_resume(path, cfg)
        files = state.get("files") or {n: f"{n}.safetensors" for n in ("adapters", "optimizer")}
        for name in ("adapters", "optimizer"):
            arrays, meta = mx.load(os.path.join(d, files[name]), return_metadata=True)
            if meta.get("step") != str(state["step"]):
                raise ConfigError(
                    "resume_adapter_file",
                    path,
                    f"the checkpoint is incomplete ({name} from step "
                    f"{meta.get('step')}, state from step {state['step']}); the run was killed "
                    "while saving: resume from an earlier NNNNNNN_adapters.safetensors",
                )
            held[name] = arrays
        return state

    state = from_rank0(read)
    for name in ("adapters", "optimizer"):
        state[name] = arrays_from_rank0(lambda name=name: held[name])
    return state


def restore(trainer, state: dict) -> None:
    trainer.model.load_weights(list(state["adapters"].items()), strict=False)
    trainer.opt.state = tree_unflatten(list(state["optimizer"].items()))
    trainer.state.set(
        LoopState(
            step=int(state["step"]),
            position=int(state["position"]),
            nonfinite_run=int(state.get("nonfinite_run", 0)),
            updates=int(state.get("updates", state["step"])),  # older checkpoints: assume every step updated
            judge_state=state.get("judge_state"),
        )
    )
    trainer.order.begin_step()  # the next step starts where the checkpoint's data position is
    restore_judge(trainer.judge, trainer.state.judge_state, log=trainer.log)
    mx.eval(trainer.model.parameters())

"""A run never writes over another run's files: an ``adapter_path`` that holds them is refused,
unless the run resumes that folder's checkpoint or ``start_over`` moves the old files aside.

A run's files (:data:`RUN_FILES`): its adapters and their periodic copies, ``checkpoint/``,
``metrics.jsonl``, ``completions.jsonl``, ``test_metrics.json``, ``training.png``, ``fused/`` and
``adapter_config.json``. Anything else in the folder (a config file, notes) is the user's and
stays where it is. ``start_over`` moves the run's files into ``<adapter_path>.<YYYYmmdd-HHMMSS>``
(a rename on the same file system: nothing is copied or deleted).

Within one run: a resume removes the periodic adapter copies of the steps it redoes (metrics
rows of those steps are dropped by the metrics log) and moves the earlier part's results
(:data:`RESULTS`) aside under their date, to be made again at the end where the run's settings
ask for them; a test result is kept under its date when a new one is written; a fused model is
replaced only once the new one is complete.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import re
import shutil
import time
from typing import Optional

from mlx_xpo_plugin.errors import ConfigError

RUN_FILES = (
    "adapters.safetensors",
    "[0-9][0-9][0-9][0-9][0-9][0-9][0-9]_adapters.safetensors",
    "checkpoint",
    "metrics.jsonl",
    "completions.jsonl",
    "test_metrics.json",
    "test_metrics.*.json",
    "training.png",
    "training.*.png",
    "fused",
    "fused.*",
    "adapter_config.json",
)

#: a run's results that describe its adapters at the step they were made: a resumed run moves
#: them aside (dated) before it changes the adapters
RESULTS = ("test_metrics.json", "training.png", "fused")


def run_files(path: str) -> list[str]:
    """The names in ``path`` that belong to a run (sorted); [] for a missing or empty folder."""
    try:
        names = os.listdir(path)
    except OSError:
        return []
    return sorted(n for n in names if any(fnmatch.fnmatch(n, p) for p in RUN_FILES))


def _when(path: str) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(os.path.getmtime(path)))


def describe(path: str) -> str:
    """What the run in ``path`` got to, in words: steps done, whether it finished, when it saved."""
    state = os.path.join(path, "checkpoint", "state.json")
    try:
        with open(state) as f:
            s = json.load(f)
        done = "a finished" if s.get("final") else "an interrupted"
        return f"{done} run: {s['step']} of {s.get('iters', '?')} steps, checkpoint saved {_when(state)}"
    except (OSError, ValueError, KeyError, TypeError):
        pass
    metrics = os.path.join(path, "metrics.jsonl")
    if os.path.isfile(metrics):
        last = 0
        with open(metrics) as f:
            for line in f:
                try:
                    last = max(last, int(json.loads(line).get("step", 0)))
                except (ValueError, TypeError, AttributeError):
                    break
        return f"a run without a checkpoint: metrics up to step {last}, written {_when(metrics)}"
    names = run_files(path)
    return f"files of another run ({', '.join(names[:4])}), last written {_when(os.path.join(path, names[0]))}"


def resumes_here(cfg) -> bool:
    """True when the run resumes the checkpoint of its own ``adapter_path``."""
    if not cfg.resume_adapter_file:
        return False
    from mlx_xpo_plugin.loop.checkpoints import find_checkpoint

    try:
        found = find_checkpoint(cfg.resume_adapter_file)
    except ConfigError:
        return False
    return os.path.realpath(os.path.dirname(found)) == os.path.realpath(cfg.adapter_path)


class RunExists(ConfigError):
    """``adapter_path`` holds another run; the message names it and the two ways on."""

    def __init__(self, path: str, what: str, resume: Optional[str]):
        ValueError.__init__(
            self,
            f"adapter_path: {path!r} holds {what}; nothing was changed. "
            + (f"To continue it: {resume} ; " if resume else "It has no checkpoint to resume from; ")
            + f"to start a new run there, add --start-over (start_over: true), which moves the old "
            f"run's files to {path}.<date-time>; or set another adapter_path",
        )
        self.setting, self.value, self.valid, self.hint = "adapter_path", path, what, ""


def check(cfg, resume_command) -> None:
    """Refuse a training run on a folder holding another run (see the module docstring); when
    there is a checkpoint, the refusal names the command that resumes it,
    ``resume_command(cfg, its mode, its number of processes)``, with this run's ``iters`` where
    a finished run would go further (else twice the finished run's steps)."""
    if not cfg.train or getattr(cfg, "start_over", False) or resumes_here(cfg):
        return
    if not run_files(cfg.adapter_path):
        return
    resume = None
    try:
        with open(os.path.join(cfg.adapter_path, "checkpoint", "state.json")) as f:
            state = json.load(f)
        made = {**(state.get("fingerprint") or {}), **(state.get("config") or {})}
        resume = resume_command(cfg, made.get("train_mode"), made.get("processes") or 1)
        if state.get("final"):
            more = cfg.iters if isinstance(cfg.iters, int) and cfg.iters > state["step"] else None
            resume += f" --iters {more or 2 * state['step']}"  # runnable as printed: twice as long
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    raise RunExists(cfg.adapter_path, describe(cfg.adapter_path), resume)


def move_aside(path: str) -> Optional[str]:
    """Move the run's files in ``path`` into a new ``<path>.<YYYYmmdd-HHMMSS>`` folder; returns it
    (None when there was nothing to move)."""
    names = run_files(path)
    if not names:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest, n = f"{os.path.normpath(path)}.{stamp}", 1
    while os.path.exists(dest):
        n += 1
        dest = f"{os.path.normpath(path)}.{stamp}-{n}"
    os.makedirs(dest)
    for name in names:
        os.rename(os.path.join(path, name), os.path.join(dest, name))
    return dest


def drop_copies_after(adapter_path: str, step: int) -> list[str]:
    """Remove the ``NNNNNNN_adapters.safetensors`` copies of steps after ``step``; their names."""
    gone = []
    for name in sorted(os.listdir(adapter_path)):
        m = re.fullmatch(r"(\d{7})_adapters\.safetensors", name)
        if m and int(m.group(1)) > step:
            os.remove(os.path.join(adapter_path, name))
            gone.append(name)
    return gone


def move_dated(path: str) -> str:
    """Rename the file or folder ``path`` to ``<stem>.<its date-time><ext>`` (a free name:
    ``test_metrics.20261207-215501.json``, ``fused.20261207-215501``); returns the new path."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(os.path.getmtime(path)))
    stem, ext = os.path.splitext(path) if os.path.isfile(path) else (os.path.normpath(path), "")
    dest, n = f"{stem}.{stamp}{ext}", 1
    while os.path.exists(dest):  # two results within one second
        n += 1
        dest = f"{stem}.{stamp}-{n}{ext}"
    os.rename(path, dest)
    return dest


def keep_previous(path: str) -> None:
    """Rename an existing result file to ``<name>.<its date-time>.json`` and say so."""
    if os.path.isfile(path):
        print(f"test: the previous result was kept as {move_dated(path)}")


def made_again(cfg, name: str) -> bool:
    """Whether this run makes the result ``name`` (one of :data:`RESULTS`) again when it finishes."""
    if name == "training.png":
        return importlib.util.find_spec("matplotlib") is not None
    return bool(cfg.test if name == "test_metrics.json" else cfg.fuse)


def set_aside_results(cfg, step: int) -> list[str]:
    """Move the earlier part's results (:data:`RESULTS`) aside under their date and say so in one
    line, with the ones this run makes again; returns the names moved."""
    moved = {name: move_dated(p) for name in RESULTS if os.path.exists(p := os.path.join(cfg.adapter_path, name))}
    if moved:
        again = [name for name in moved if made_again(cfg, name)]
        print(
            f"resume: the results made before step {step} describe older adapters and were moved aside ("
            + ", ".join(f"{name} -> {os.path.basename(dest)}" for name, dest in moved.items())
            + (f"); made again when this run finishes: {', '.join(again)}" if again else ")")
        )
    return list(moved)


def replace_folder(new: str, dest: str) -> bool:
    """Put the folder ``new`` at ``dest``; an old ``dest`` is removed only once ``new`` is in
    place. True when one was replaced."""
    old = dest + ".old"
    had = os.path.isdir(dest)
    if had:
        shutil.rmtree(old, ignore_errors=True)
        os.rename(dest, old)
    os.rename(new, dest)
    if had:
        shutil.rmtree(old, ignore_errors=True)
    return had


def begin_writing(cfg, resume) -> list[str]:
    """The first writes of a training run, after every refusal: move another run's files aside
    (start_over); for a resumed run, drop the periodic copies of the steps it redoes and move
    the earlier part's results aside (their names are returned)."""
    if cfg.start_over and not resumes_here(cfg):
        moved = move_aside(cfg.adapter_path)
        if moved:
            print(f"start_over: the previous run's files were moved to {moved}")
    if resume:
        dropped = drop_copies_after(cfg.adapter_path, int(resume["step"]))
        if dropped:
            print(
                f"resume: removed {len(dropped)} periodic adapter copies of steps after {resume['step']} "
                f"({', '.join(dropped)}): this run redoes those steps"
            )
        return set_aside_results(cfg, int(resume["step"]))
    return []

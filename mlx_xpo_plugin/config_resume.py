"""The settings of a resumed run: its checkpoint's, and what a setting given again may change.

A checkpoint keeps the run's resolved settings (state.json ``config``), so
``--train-mode <mode> --resume-adapter-file <folder>`` alone resumes them: they replace the
defaults, and a setting given again (a flag, a ``--config`` file, a key of the Python API's
dict) counts only as the settings table's ``on_resume`` column (config.py) allows:

- ``same`` (the default): it decides what the run computes (model, data, batches, lengths, loss,
  schedule, seed, learning rate, sampling, precision): it must equal the checkpoint's value, or
  the run is refused with both values named;
- ``length`` (iters, epochs): may change, but not below the steps already done;
- ``free``: how the run reports, validates, saves, stops, tests, fuses and uses memory
  (steps_per_report, save_every, wandb, micro_batch_size, ...): may change, and the run says so;
- ``judge``: the judge and its options decide the verdicts and must match, except how an
  endpoint is reached (its address, ``api_key_env``, timeouts, retries, concurrency) and a model
  judge's ``batch_size``;
- ``folder`` (adapter_path): the resumed folder; another folder is refused;
- ``this_run`` (resume_adapter_file, config, start_over): this command's, never the checkpoint's.

A path is the same when it names the same file or folder (``./m`` and ``m``). A changed setting
that may change is said in one line: ``resuming with steps_per_report=5 (was 10)``.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from mlx_xpo_plugin import config
from mlx_xpo_plugin.errors import ConfigError
from mlx_xpo_plugin.loop.checkpoints import read_state
from mlx_xpo_plugin.loop.jsonio import dumps
from mlx_xpo_plugin.loop.share import from_rank0

#: judge_config keys that say how verdicts are fetched, not what they are
JUDGE_TRANSPORT = ("api_key_env", "timeout", "max_retries", "backoff", "concurrency", "batch_size")

#: settings whose value may name a local file or folder
PATHS = ("model", "data", "reference_model_path", "judge")


def resume_path(cli: dict, explicit: set, yaml_values: dict) -> Optional[str]:
    """The ``resume_adapter_file`` this run was given (command line over YAML), or None."""
    if "resume_adapter_file" in explicit and cli.get("resume_adapter_file"):
        return cli["resume_adapter_file"]
    return yaml_values.get("resume_adapter_file") or None


def run_folder(checkpoint_dir: str, typed: str) -> str:
    """The adapter folder of a checkpoint folder, spelt as the user typed the path (relative
    stays relative)."""
    folder = os.path.dirname(os.path.abspath(checkpoint_dir))
    return folder if os.path.isabs(typed) else os.path.relpath(folder)


def resolve_run(mode: str, cli: dict, explicit: set, yaml_values: dict):
    """config.resolve, with a resumed checkpoint's settings in place of the defaults. A setting
    given again with the checkpoint's value in another spelling (``./m`` for ``m``) takes the
    checkpoint's spelling. What a setting given again may not change is refused later, by
    :func:`check` (preflight: before anything is written or loaded)."""
    path = resume_path(cli, explicit, yaml_values)
    if not path:
        return config.resolve(mode, cli, explicit, yaml_values)
    d, state = from_rank0(lambda: read_state(path))  # data parallel: process 0 reads, every process receives
    stored = stored_settings(state)
    base = {k: v for k, v in stored.items() if k in config.SETTINGS and config.SETTINGS[k].on_resume != "this_run"}
    base["adapter_path"] = run_folder(d, path)
    cfg = config.resolve(mode, cli, explicit, yaml_values, base=base)
    for name, value in base.items():
        if getattr(cfg, name) != value and same(name, getattr(cfg, name), value):
            setattr(cfg, name, value)
    return cfg


def stored_settings(state: dict) -> dict:
    """The resolved settings a checkpoint's state.json keeps ({} for a checkpoint without them:
    its run is resumed with the settings given, checked against its fingerprint)."""
    stored = state.get("config")
    return dict(stored) if isinstance(stored, dict) else {}


def _json(v):
    return json.loads(dumps(v))  # what a checkpoint keeps of it (tuples are lists, and so on)


def same(name: str, a, b) -> bool:
    """Whether two values of the setting ``name`` are the same (as JSON; paths by what they name)."""
    a, b = _json(a), _json(b)
    if a == b:
        return True
    if name in PATHS and isinstance(a, str) and isinstance(b, str) and os.path.exists(a) and os.path.exists(b):
        return os.path.realpath(a) == os.path.realpath(b)
    return False


def _endpoint(judge) -> bool:
    return isinstance(judge, str) and judge.startswith(("http://", "https://"))


def _judge_changes(new: dict, old: dict) -> tuple[list, list]:
    """(keys of judge_config that decide verdicts and differ, transport keys that differ)."""
    keys = sorted(set(new) | set(old))
    differ = [k for k in keys if not same(k, new.get(k), old.get(k))]
    return [k for k in differ if k not in JUDGE_TRANSPORT], [k for k in differ if k in JUDGE_TRANSPORT]


def _refuse(path: str, name: str, old, new, hint: str) -> ConfigError:
    return ConfigError(
        "resume_adapter_file",
        path,
        f"the checkpoint was made with {name}={old!r}, this run has {name}={new!r}",
        hint,
    )


def check(cfg, checkpoint_dir: str, state: dict) -> list[str]:
    """Refuse a setting given again that may not change (see the module docstring; raises
    ConfigError, one line). Returns the changes that are allowed, as ``name=new (was old)``."""
    stored = stored_settings(state)
    path, changes = cfg.resume_adapter_file, []
    folder = os.path.dirname(os.path.abspath(checkpoint_dir))
    if os.path.realpath(cfg.adapter_path) != os.path.realpath(folder):
        raise ConfigError(
            "adapter_path",
            cfg.adapter_path,
            f"a resumed run writes into the folder it resumes ({run_folder(checkpoint_dir, path)})",
            "leave adapter_path out (a --config file sets it too), or copy that folder and resume the copy",
        )
    if not stored:  # an older checkpoint: its fingerprint is checked (checkpoints.check_resume)
        return changes
    keep = "leave it out: a resumed run keeps its checkpoint's settings; or start a new run"
    for name, s in config.SETTINGS.items():
        new, old = getattr(cfg, name), stored.get(name, s.default)
        if s.on_resume in ("this_run", "folder") or same(name, new, old):
            continue
        if s.on_resume == "length":
            steps = int(state.get("step", 0))
            if name == "iters" and new is not None and new < steps:
                raise _refuse(path, name, old, new, f"it has done {steps} steps: iters may grow, not shrink below them")
            if name == "epochs" and new is not None and old is not None and new < old:
                raise _refuse(path, name, old, new, "epochs may grow, not shrink")
        elif s.on_resume == "judge" and name == "judge":
            if not (_endpoint(new) and _endpoint(old)):  # only an endpoint's address may change
                raise _refuse(path, name, old, new, keep)
        elif s.on_resume == "judge":
            decide, transport = _judge_changes(new or {}, old or {})
            if decide:
                k = decide[0]
                raise _refuse(path, f"judge_config.{k}", (old or {}).get(k), (new or {}).get(k), keep)
            changes += [f"judge_config.{k}={(new or {}).get(k)!r} (was {(old or {}).get(k)!r})" for k in transport]
            continue
        elif name == "train_mode":
            raise _refuse(path, name, old, new, f"resume it with --train-mode {old}")
        elif s.on_resume != "free":
            raise _refuse(path, name, old, new, keep)
        changes.append(f"{name}={new!r} (was {old!r})")
    return changes

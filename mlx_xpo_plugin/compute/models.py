"""Where a model setting points: a local model folder, or a model id already in the local
Hugging Face cache. Nothing is ever downloaded."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from mlx_xpo_plugin.errors import ConfigError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def same_folder(a: Optional[str], b: Optional[str]) -> bool:
    """Whether two settings name the same model (the same text, or the same resolved path)."""
    if not a or not b:
        return False
    if a == b:
        return True
    try:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except (OSError, RuntimeError):
        return False


def cached_hub_folder(repo_id: str) -> Optional[str]:
    """The local snapshot folder of ``repo_id`` when its config and weights are already cached."""
    try:
        from huggingface_hub import try_to_load_from_cache  # optional: only for hub ids
    except ImportError:
        return None
    try:
        hit = try_to_load_from_cache(repo_id, "config.json")
    except Exception:
        return None
    if not isinstance(hit, str):
        return None
    folder = Path(hit).parent
    return str(folder) if any(folder.glob("*.safetensors")) else None


def model_folder(setting: str, spec: str, otherwise: str = "", file_hint: str = "") -> str:
    """The folder to load for ``setting``; ConfigError naming the setting otherwise.

    ``otherwise`` lists what else the setting accepts (for an error on a name that is neither a
    folder nor a model id); ``file_hint`` is said when the path is a file."""
    p = Path(spec).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ConfigError(
                setting, spec, "is a file; expected a model folder (config.json, *.safetensors)", file_hint
            )
        if not (p / "config.json").is_file():
            raise ConfigError(
                setting, spec, "the folder has no config.json, so it is not a model folder mlx_lm can load"
            )
        return str(p)
    if HUB_ID.match(spec) and not spec.startswith((".", "~")):
        cached = cached_hub_folder(spec)
        if cached:
            return cached
        raise ConfigError(
            setting,
            spec,
            "no such local folder, and not in the local Hugging Face cache; this plugin never downloads models",
            f"it does not download at run time: download it first (e.g. `hf download {spec} "
            f"--local-dir models/{spec.split('/')[-1]}`) and set {setting} to that folder",
        )
    raise ConfigError(setting, spec, "no such model folder" + (f"; {otherwise}" if otherwise else ""))

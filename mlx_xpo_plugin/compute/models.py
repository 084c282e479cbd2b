"""Where a model setting points: a local model folder, used as it is, or else a model id on the
Hugging Face hub, downloaded into its cache on first use as mlx-lm downloads it (compute/hub.py)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from mlx_xpo_plugin.compute.hub import download
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


def model_folder(setting: str, spec: str, otherwise: str = "", file_hint: str = "", weights: bool = True) -> str:
    """The folder to load for ``setting``; ConfigError naming the setting otherwise.

    ``otherwise`` lists what else the setting accepts (for an error on a name that is neither a
    folder nor a model id); ``file_hint`` is said when the path is a file. Without ``weights`` a hub
    id's configs and tokenizer are enough (what ``mlx-xpo estimate`` reads)."""
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
        return download(setting, spec, weights)
    raise ConfigError(setting, spec, "no such model folder" + (f"; {otherwise}" if otherwise else ""))

"""User-facing errors: one line naming the setting, the value and what is valid."""

from __future__ import annotations

import difflib

from mlx_xpo_plugin.exits import Exit


class ConfigError(ValueError):
    """Bad input. ``str(err)`` is the one-line message a user sees; CLIs exit with status 2."""

    exit_status = Exit.BAD_INPUT

    def __init__(self, setting: str, value, valid: str, hint: str = ""):
        self.setting, self.value, self.valid, self.hint = setting, value, valid, hint
        shown = setting if setting.isprintable() else repr(setting)  # a key from the user may hold "\n"
        msg = f"{shown}: {value!r} is not valid; {valid}"
        if hint:
            msg += f" ({hint})"
        super().__init__(msg)


def did_you_mean(name: str, candidates) -> str:
    """'did you mean 'x'?' for the closest candidate, or ''."""
    m = difflib.get_close_matches(str(name), [str(c) for c in candidates], n=1, cutoff=0.6)
    return f"did you mean {m[0]!r}?" if m else ""


class StopTraining(Exception):
    """Raised (e.g. by the human judge on 'q') to end training cleanly: adapters are saved."""


class SaveFailed(OSError):
    """Writing a checkpoint or a log failed (disk full, unwritable folder); the previous checkpoint
    is intact. ``str(err)`` is the one-line message; ``checkpoint`` the folder to resume from."""

    exit_status = Exit.SAVE

    def __init__(self, message: str, checkpoint: str = ""):
        super().__init__(message)
        self.message, self.checkpoint = message, checkpoint

    def __str__(self):
        return self.message

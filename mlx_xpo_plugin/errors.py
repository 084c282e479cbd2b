"""User-facing errors: one line naming the setting, the value and what is valid."""

from __future__ import annotations


class ConfigError(ValueError):
    """Bad input. ``str(err)`` is the one-line message a user sees; CLIs exit with status 2."""

    exit_status = 2

    def __init__(self, setting: str, value, valid: str, hint: str = ""):
        self.setting, self.value, self.valid, self.hint = setting, value, valid, hint
        shown = setting if setting.isprintable() else repr(setting)  # a key from the user may hold "\n"
        msg = f"{shown}: {value!r} is not valid; {valid}"
        if hint:
            msg += f" ({hint})"
        super().__init__(msg)


class StopTraining(Exception):
    """Raised (e.g. by the human judge on 'q') to end training cleanly: adapters are saved."""

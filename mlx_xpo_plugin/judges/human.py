"""Terminal judge: ``judge: human``.

For each pair it prints the prompt and the two completions, numbered 1 and 2, and reads one line:

* ``1`` or ``a``: the first completion is better (winner 0);
* ``2`` or ``b``: the second is better (winner 1);
* ``s``: skip this pair: an invalid verdict (``winner None``, ``tie False``, ``raw "skip"``),
  which the trainer drops and counts;
* ``q``: quit: raises :class:`~mlx_xpo_plugin.errors.StopTraining`, so that training ends
  cleanly with its adapters saved; end of input (Ctrl-D) does the same;
* anything else: a one-line hint, and the question again.

While pairs are shown, the run's progress bar is cleared (it is drawn again after the last answer),
so that no prompt is written onto the bar's line. Needs an interactive terminal: when standard
input is not a TTY, ``check`` and ``build`` raise a ConfigError at once instead of waiting for
input that never comes. Pairs are shown in their given
order unless ``judge_config: {shuffle: true}`` (then each pair is swapped with probability 1/2,
seeded, and the answer is mapped back).
"""

from __future__ import annotations

import random
import sys
from typing import Optional, Sequence, TextIO

from mlx_xpo_plugin.config import Setting
from mlx_xpo_plugin.contracts import JudgeContext, Verdict
from mlx_xpo_plugin.errors import ConfigError, StopTraining
from mlx_xpo_plugin.judges.common import SeededOrder, draw_flips, options, resolve_options, unflip

OPTIONS = options(Setting("shuffle", "bool", False, "show each pair in a random order"))

QUESTION = "Which is better? [1/a] first, [2/b] second, [s] skip, [q] quit: "
HINT = "Please type 1 (or a), 2 (or b), s to skip, or q to quit."
_ANSWERS = {"1": 0, "a": 0, "2": 1, "b": 1}

RULE = "=" * 72


class HumanJudge(SeededOrder):
    """A PairwiseJudge that asks a person at the terminal (see the module docstring)."""

    concurrent = True  # it waits for the person: the reference pass computes meanwhile

    def __init__(
        self, stdin: Optional[TextIO] = None, stdout: Optional[TextIO] = None, shuffle: bool = False, seed: int = 0
    ):
        self.stdin = stdin if stdin is not None else sys.stdin
        self.stdout = stdout if stdout is not None else sys.stdout
        self.shuffle = shuffle
        self.rng = random.Random(seed)
        self.last_metrics: dict = {}

    def _say(self, text: str = "", end: str = "\n") -> None:
        self.stdout.write(text + end)
        self.stdout.flush()

    def _ask(self) -> Verdict:
        while True:
            self._say(QUESTION, end="")
            line = self.stdin.readline()
            if line == "":  # end of input
                self._say()
                raise StopTraining("the human judge's input ended")
            key = line.strip().lower()
            if key in _ANSWERS:
                return Verdict(_ANSWERS[key], None, key)
            if key == "s":
                return Verdict.bad("skip", "skipped")
            if key == "q":
                raise StopTraining("the human judge quit")
            self._say(HINT)

    def judge(self, prompts: Sequence[str], pairs: Sequence[tuple[str, str]]) -> list[Verdict]:
        if len(prompts) != len(pairs):
            raise ValueError(f"{len(prompts)} prompts but {len(pairs)} pairs")
        from tqdm import tqdm  # the progress bar's: imported with the first pair shown, not at start-up

        flips = draw_flips(self.rng, len(pairs)) if self.shuffle else [False] * len(pairs)
        out = []
        # the run's progress bar is cleared while pairs are shown and answered, drawn again after
        with tqdm.external_write_mode(file=self.stdout):
            for i, (prompt, (a, b), flip) in enumerate(zip(prompts, pairs, flips)):
                first, second = (b, a) if flip else (a, b)
                self._say(RULE)
                self._say(f"Pair {i + 1} of {len(pairs)}")
                self._say(f"PROMPT:\n{prompt}\n")
                self._say(f"[1] FIRST COMPLETION:\n{first}\n")
                self._say(f"[2] SECOND COMPLETION:\n{second}\n")
                out.append(unflip(self._ask(), flip))
        self.last_metrics = {"judge/skipped": sum(v.raw == "skip" for v in out)}
        return out


def matches(spec: str) -> bool:
    return spec == "human"


def _need_tty(stdin) -> None:
    try:
        ok = stdin is not None and stdin.isatty()
    except (AttributeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(
            "judge",
            "human",
            "needs an interactive terminal on standard input",
            "run training from a terminal, or use a model path, an http(s):// URL or 'module:callable' as the judge",
        )


def check(spec: str, ctx: JudgeContext) -> None:
    resolve_options("human", ctx.judge_config, OPTIONS)
    _need_tty(sys.stdin)


def build(spec: str, ctx: JudgeContext) -> HumanJudge:
    opts = resolve_options("human", ctx.judge_config, OPTIONS)
    _need_tty(sys.stdin)
    return HumanJudge(shuffle=opts["shuffle"], seed=ctx.seed)

"""The terminal judge, driven through a real pseudo-terminal as a person would use it."""

from __future__ import annotations

import io
import json
import os
import select
import subprocess
import sys
import textwrap
import time

import pytest

from mlx_xpo_plugin.contracts import JudgeContext
from mlx_xpo_plugin.errors import ConfigError, StopTraining
from mlx_xpo_plugin.host.registry import Registry, build_judge, check_judge
from mlx_xpo_plugin.judges.builtin import BUILTIN_JUDGE_FACTORIES
from mlx_xpo_plugin.judges.human import HINT, QUESTION, HumanJudge

pytestmark = pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a POSIX pty")

SCRIPT = textwrap.dedent("""
    import json, sys
    from mlx_xpo_plugin.errors import StopTraining
    from mlx_xpo_plugin.contracts import JudgeContext
    from mlx_xpo_plugin.judges.builtin import BUILTIN_JUDGE_FACTORIES as F
    from mlx_xpo_plugin.host.registry import Registry, build_judge

    judge = build_judge("human", JudgeContext(), Registry(judges={f.name: f for f in F}))
    try:
        vs = judge.judge(["Say hi", "Name a fruit", "Count to two"],
                         [("hello there", "go away"), ("a rock", "an apple"), ("1 2", "one two")])
    except StopTraining as e:
        print("STOPPED:", e, flush=True)
        sys.exit(3)
    print("VERDICTS:", json.dumps([[v.winner, v.tie, v.raw] for v in vs]), flush=True)
""")


class Terminal:
    """A child process whose stdin/stdout/stderr are the slave side of a new pty."""

    def __init__(self, script_path: str):
        self.master, slave = os.openpty()
        self.proc = subprocess.Popen(
            [sys.executable, script_path], stdin=slave, stdout=slave, stderr=slave, close_fds=True
        )
        os.close(slave)
        self.out, self.pos = "", 0

    def read_until(self, needle: str, timeout: float = 30.0) -> str:
        """Output up to and including the next ``needle`` after what was already consumed."""
        deadline = time.monotonic() + timeout
        while needle not in self.out[self.pos :]:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {needle!r} within {timeout}s; output:\n{self.out}")
            r, _, _ = select.select([self.master], [], [], min(left, 0.5))
            if r:
                try:
                    chunk = os.read(self.master, 4096)
                except OSError:  # EIO: the child closed the terminal
                    chunk = b""
                if not chunk:
                    if self.proc.poll() is not None and needle not in self.out[self.pos :]:
                        raise AssertionError(f"child exited before {needle!r}:\n{self.out}")
                    continue
                self.out += chunk.decode("utf-8", "replace")
        end = self.out.index(needle, self.pos) + len(needle)
        seen, self.pos = self.out[self.pos : end], end
        return seen

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def close(self) -> int:
        try:
            return self.proc.wait(timeout=20)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            os.close(self.master)


@pytest.fixture
def terminal(tmp_path):
    path = tmp_path / "human_judge_session.py"
    path.write_text(SCRIPT)
    t = Terminal(str(path))
    yield t
    if t.proc.poll() is None:
        t.proc.kill()
        t.proc.wait()


def test_pty_session(terminal):
    first = terminal.read_until(QUESTION)
    assert "Pair 1 of 3" in first and "Say hi" in first
    assert "[1] FIRST COMPLETION:\nhello there" in first.replace("\r\n", "\n")
    assert "[2] SECOND COMPLETION:\ngo away" in first.replace("\r\n", "\n")
    terminal.type("x\n")  # a bad key: a hint, then the same question again
    terminal.read_until(HINT)
    again = terminal.read_until(QUESTION)
    assert "Pair 2" not in again
    terminal.type("1\n")
    assert "an apple" in terminal.read_until(QUESTION)
    terminal.type("2\n")
    assert "Count to two" in terminal.read_until(QUESTION)
    terminal.type("s\n")
    terminal.read_until("VERDICTS: ")
    verdicts = json.loads(terminal.read_until("\n").strip())
    assert verdicts == [[0, False, "1"], [1, False, "2"], [None, False, "skip"]]
    assert terminal.close() == 0


def test_pty_quit_stops_training(terminal):
    terminal.read_until(QUESTION)
    terminal.type("a\n")
    terminal.read_until(QUESTION)
    terminal.type("q\n")
    assert "the human judge quit" in terminal.read_until("STOPPED: the human judge quit")
    assert terminal.close() == 3


def test_not_a_tty_fails_fast(tmp_path):
    code = (
        "from mlx_xpo_plugin.host.registry import Registry, check_judge;"
        "from mlx_xpo_plugin.judges.builtin import BUILTIN_JUDGE_FACTORIES as F;"
        "from mlx_xpo_plugin.contracts import JudgeContext;"
        "check_judge('human', JudgeContext(), Registry(judges={f.name: f for f in F}))"
    )
    t0 = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-c", code], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60
    )
    assert time.monotonic() - t0 < 30
    assert out.returncode != 0
    assert ("ConfigError: judge: 'human' is not valid; needs an interactive terminal on standard input") in out.stderr


def test_not_a_tty_in_process(monkeypatch):
    reg = Registry(judges={f.name: f for f in BUILTIN_JUDGE_FACTORIES})
    monkeypatch.setattr(sys, "stdin", io.StringIO("1\n"))
    for call in (check_judge, build_judge):
        with pytest.raises(ConfigError, match="needs an interactive terminal") as e:
            call("human", JudgeContext(), reg)
        assert "\n" not in str(e.value)


def test_bad_config_key(monkeypatch):
    reg = Registry(judges={f.name: f for f in BUILTIN_JUDGE_FACTORIES})
    with pytest.raises(ConfigError, match="did you mean 'shuffle'"):
        check_judge("human", JudgeContext(judge_config={"shufle": True}), reg)


# ---------------------------------------------------------------------------------------------
# the same judge on in-memory streams


def run(answers: str, n: int = 3, **kw):
    out = io.StringIO()
    j = HumanJudge(stdin=io.StringIO(answers), stdout=out, **kw)
    vs = j.judge([f"prompt {i}" for i in range(n)], [(f"A{i}", f"B{i}") for i in range(n)])
    return j, vs, out.getvalue()


def test_keys_and_hints():
    j, vs, out = run("\nzz\nA\n  b  \n1x\n2\n", n=3)
    assert [v.winner for v in vs] == [0, 1, 1]
    assert out.count(HINT) == 3  # empty line, 'zz', '1x'
    assert j.last_metrics == {"judge/skipped": 0}


def test_skip_is_invalid_not_a_tie():
    j, vs, _ = run("s\nS\n1\n")
    assert [v.invalid for v in vs] == [True, True, False]
    assert vs[0].raw == "skip" and not vs[0].tie and vs[2].winner == 0
    assert j.last_metrics == {"judge/skipped": 2}


@pytest.mark.parametrize("answers, msg", [("1\nq\n", "quit"), ("1\n", "input ended")])
def test_quit_and_end_of_input_raise_stop_training(answers, msg):
    with pytest.raises(StopTraining, match=msg):
        run(answers)


def test_shuffle_maps_back():
    n = 40
    # always pick the completion shown first
    j, vs, out = run("1\n" * n, n=n, shuffle=True, seed=4)
    import random

    from mlx_xpo_plugin.judges.common import draw_flips

    flips = draw_flips(random.Random(4), n)
    assert 0 < sum(flips) < n
    assert [v.winner for v in vs] == [1 if f else 0 for f in flips]
    # what was shown first really was b when flipped
    blocks = out.split("Pair ")[1:]
    for i, (b, f) in enumerate(zip(blocks, flips)):
        assert f"[1] FIRST COMPLETION:\n{'B' if f else 'A'}{i}\n" in b


def test_pairs_are_never_written_onto_the_progress_bar():
    """A run's tqdm bar ends its line with no newline; the judge's first line must not follow it
    on that line: the bar is cleared while pairs are shown, and drawn again after."""
    from tqdm import tqdm

    from mlx_xpo_plugin.judges.human import RULE

    out = io.StringIO()
    bar = tqdm(total=10, desc="xpo", file=out, dynamic_ncols=False, ncols=60)
    bar.update(3)
    try:
        HumanJudge(stdin=io.StringIO("1\n2\n"), stdout=out).judge(["p", "q"], [("a", "b"), ("c", "d")])
        drawn_after = out.getvalue().rsplit(RULE, 1)[1]
    finally:
        bar.close()
    first = next(line for line in out.getvalue().split("\n") if RULE in line)
    assert first.rsplit("\r", 1)[-1] == RULE  # what the terminal shows on that line: the rule alone
    assert "3/10" in drawn_after  # the bar is back after the answers

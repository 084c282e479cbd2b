"""An example third-party plugin for mlx-lm-lora + mlx-xpo-plugin.

Install it next to them (`pip install examples/my_judge_plugin`) and

* ``judge: shortest`` becomes available to --train-mode xpo / online_dpo (prefers the shorter
  completion; ``judge_config: {min_chars: N}`` makes completions under N characters invalid);
* ``--train-mode count_prompts`` is a new train mode that counts the training prompts.
"""

from __future__ import annotations

import json
import os

from mlx_xpo_plugin import ConfigError, JudgeFactory, TrainMode, Verdict, hookimpl


class ShortestJudge:
    def __init__(self, min_chars: int = 0):
        self.min_chars = min_chars

    def judge(self, prompts, pairs):
        out = []
        for a, b in pairs:
            if min(len(a), len(b)) < self.min_chars:
                out.append(Verdict.bad(raw=(len(a), len(b))))
            elif len(a) == len(b):
                out.append(Verdict.tied())
            else:
                out.append(Verdict(0 if len(a) < len(b) else 1))
        return out


def _check(spec, ctx):
    unknown = set(ctx.judge_config) - {"min_chars"}
    if unknown:
        raise ConfigError(
            f"judge_config.{sorted(unknown)[0]}", ctx.judge_config, "the shortest judge takes min_chars only"
        )


SHORTEST = JudgeFactory(
    name="shortest",
    matches=lambda spec: spec == "shortest",
    check=_check,
    build=lambda spec, ctx: ShortestJudge(int(ctx.judge_config.get("min_chars", 0))),
    priority=95,
)


def count_prompts_main(args, explicit) -> int:
    """A complete (tiny) train mode: counts train.jsonl rows and writes the count to adapter_path."""
    data = getattr(args, "data", None) or "data"
    path = os.path.join(data, "train.jsonl")
    if not os.path.isfile(path):
        print(f"error: data: {data!r} has no train.jsonl")
        return 2
    n = sum(1 for line in open(path) if line.strip())
    out = getattr(args, "adapter_path", None) or "adapters"
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "count.json"), "w") as f:
        json.dump({"train_prompts": n}, f)
    print(f"count_prompts: {n} training prompts")
    return 0


@hookimpl
def register_judges(register):
    register(SHORTEST)


@hookimpl
def register_train_modes(register):
    register(TrainMode(name="count_prompts", description="count the training prompts", main=count_prompts_main))

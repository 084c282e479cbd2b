"""Helpers the judge adapters share: ``judge_config`` validation, the pairwise prompt, order
shuffling with a correct (invalid-preserving) map back, and combining both orders."""

from __future__ import annotations

import dataclasses
import random
from typing import Optional, Sequence

from mlx_xpo_plugin.config import Setting, check_value
from mlx_xpo_plugin.contracts import Judge, Verdict
from mlx_xpo_plugin.errors import ConfigError, did_you_mean

# ---------------------------------------------------------------------------------------------
# judge_config validation


def options(*settings: Setting) -> dict[str, Setting]:
    """A judge's ``judge_config`` keys: each a :class:`..config.Setting` (validated like every
    other setting), renamed ``judge_config.<key>`` for its messages."""
    return {s.name: dataclasses.replace(s, name=f"judge_config.{s.name}") for s in settings}


def resolve_options(judge_kind: str, judge_config, schema: dict[str, Setting]) -> dict:
    """Validate ``judge_config`` against ``schema``; return every option with defaults filled in.
    Unknown keys get a did-you-mean."""
    if judge_config is None:
        judge_config = {}
    if not isinstance(judge_config, dict):
        raise ConfigError("judge_config", judge_config, "must be a mapping of option names to values")
    for key in judge_config:
        if key not in schema:
            valid = ", ".join(sorted(schema)) or "none"
            raise ConfigError(
                "judge_config",
                key,
                f"unknown option for the {judge_kind} judge; valid options: {valid}",
                did_you_mean(str(key), schema),
            )
    return {key: check_value(s, judge_config[key]) if key in judge_config else s.default for key, s in schema.items()}


# ---------------------------------------------------------------------------------------------
# the pairwise prompt

DEFAULT_RUBRIC = (
    "You are an impartial judge. Given a prompt and two responses, decide which response is "
    "better: more helpful, correct, clear and safe. Ignore the order and the length of the "
    "responses. Answer with one digit: 0 if Response 0 is better, 1 if Response 1 is better."
)

#: the user message of every pair; it always ends by asking for the digit, whatever the rubric
PAIR_TEMPLATE = "Prompt:\n{prompt}\n\nResponse 0:\n{a}\n\nResponse 1:\n{b}\n\nBetter response (0 or 1)?"


def pair_messages(rubric: Optional[str], prompt: str, a: str, b: str) -> list[dict]:
    """Chat messages asking which of ``a`` (shown as Response 0) and ``b`` (Response 1) is better.
    ``rubric`` (the ``judge_system`` setting) replaces the default system message; the closing
    "answer 0 or 1" instruction is always kept, since the labels are this plugin's contract."""
    return [
        {"role": "system", "content": rubric or DEFAULT_RUBRIC},
        {"role": "user", "content": PAIR_TEMPLATE.format(prompt=prompt, a=a, b=b)},
    ]


def render_chat(tokenizer, messages: list[dict]) -> str:
    """The chat-templated text of ``messages`` with the generation prompt. Templates that reject a
    system role get the system text merged into the user message; a tokenizer without a chat
    template gets plain text ending in "Answer:"."""
    if getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception:
            merged = [{"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}]
            return tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True)
    return messages[0]["content"] + "\n\n" + messages[1]["content"] + "\nAnswer:"


# ---------------------------------------------------------------------------------------------
# order shuffling and both orders


def rng_state(rng: random.Random) -> list:
    """The state of a judge's ``random.Random`` as JSON (for ``get_state``; see contracts.Judge)."""
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def set_rng_state(rng: random.Random, state) -> None:
    """Restore what :func:`rng_state` returned (``set_state``)."""
    version, internal, gauss = state
    rng.setstate((version, tuple(internal), gauss))


class SeededOrder(Judge):
    """Mixin of the judges whose only state is ``self.rng`` (the pair-order shuffle): they declare
    it, so that a resumed run shows the same pairs in the same order as an uninterrupted one."""

    rng: random.Random

    def get_state(self) -> dict:
        return {"rng": rng_state(self.rng)}

    def set_state(self, state: dict) -> None:
        set_rng_state(self.rng, state["rng"])


def draw_flips(rng: random.Random, n: int) -> list[bool]:
    """Which pairs to show swapped (position-bias control), from the judge's seeded ``rng``."""
    return [rng.random() < 0.5 for _ in range(n)]


def unflip(v: Verdict, flipped: bool) -> Verdict:
    """Map a verdict on a swapped pair back to the original order. A tie stays a tie and an
    invalid verdict stays invalid: only a real winner is mirrored."""
    if not flipped:
        return v
    scores = (v.scores[1], v.scores[0]) if v.scores is not None else None
    if v.winner is None:
        return Verdict(None, v.confidence, v.raw, v.tie, scores, v.reason)
    return Verdict(1 - v.winner, v.confidence, v.raw, False, scores)


def combine_orders(
    fwd: Verdict, rev: Verdict, p_second: Optional[tuple[float, float]] = None
) -> tuple[Verdict, Optional[bool]]:
    """Combine the verdict on (a, b) with the verdict on (b, a) (``rev``, still in its own order).

    Returns (verdict, consistent): consistent is None when either order was invalid (the result is
    invalid), True when both orders agree (same winner, or both ties), False otherwise (the result
    is an invalid verdict whose ``raw`` says why). ``p_second`` = (P(second better) on (a, b),
    P(second better) on (b, a)) gives the combined confidence when known.
    """
    back = unflip(rev, True)
    raw = {"a_b": fwd.raw, "b_a": rev.raw}
    if fwd.invalid or back.invalid:
        return Verdict.bad(raw, (fwd if fwd.invalid else back).reason), None
    if fwd.tie and back.tie:
        return Verdict.tied(raw), True
    if fwd.winner is not None and fwd.winner == back.winner:
        conf = None
        if p_second is not None:
            pb = 0.5 * (p_second[0] + (1.0 - p_second[1]))
            conf = min(1.0, max(0.0, pb if fwd.winner == 1 else 1.0 - pb))
        elif fwd.confidence is not None and back.confidence is not None:
            conf = 0.5 * (fwd.confidence + back.confidence)
        return Verdict(fwd.winner, conf, raw), True
    what = lambda v: "tie" if v.tie else f"winner {v.winner}"  # noqa: E731
    raw["inconsistent"] = f"order (a, b) gave {what(fwd)}, order (b, a) gave {what(back)} (in the original order)"
    return Verdict.bad(raw, f"orders disagree: (a, b) gave {what(fwd)}, (b, a) gave {what(back)}"), False


def consistency_metrics(flags: Sequence[Optional[bool]]) -> dict:
    """``judge/position_consistency``: the fraction of pairs, among those valid in both orders,
    whose two orders agree (0.0 when none is); ``judge/both_orders_valid``: how many those are."""
    valid = [f for f in flags if f is not None]
    return {
        "judge/position_consistency": (sum(valid) / len(valid)) if valid else 0.0,
        "judge/both_orders_valid": len(valid),
    }


def judge_in_order(prompts, pairs, judge_ordered, *, both_orders: bool, shuffle: bool, rng: random.Random):
    """Position-bias control shared by the model-backed judges.

    ``judge_ordered(triples)`` judges ``(prompt, first, second)`` triples as given and returns
    ``(verdicts, p_second, metrics)`` (``p_second[i]`` the judge's probability that the second is
    better, or None). With ``both_orders`` every pair is judged as (a, b) and (b, a) and only
    consistent verdicts are kept; otherwise each pair is swapped at random (when ``shuffle``) and
    the verdict mapped back (an invalid answer stays invalid). Returns (verdicts, metrics, flips).
    """
    if len(prompts) != len(pairs):
        raise ValueError(f"{len(prompts)} prompts but {len(pairs)} pairs")
    n = len(pairs)
    if both_orders:
        triples = [(p, a, b) for p, (a, b) in zip(prompts, pairs)]
        triples += [(p, b, a) for p, (a, b) in zip(prompts, pairs)]
        vs, ps, metrics = judge_ordered(triples)
        out, flags = [], []
        for i in range(n):
            known = ps[i] is not None and ps[n + i] is not None
            v, flag = combine_orders(vs[i], vs[n + i], (ps[i], ps[n + i]) if known else None)
            out.append(v)
            flags.append(flag)
        metrics.update(consistency_metrics(flags))
        return out, metrics, []
    flips = draw_flips(rng, n) if shuffle else [False] * n
    triples = [(p, b, a) if f else (p, a, b) for p, (a, b), f in zip(prompts, pairs, flips)]
    vs, _, metrics = judge_ordered(triples)
    metrics["judge/swapped"] = sum(flips)
    return [unflip(v, f) for v, f in zip(vs, flips)], metrics, flips

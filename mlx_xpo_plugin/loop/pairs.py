"""From sampled completions to training pairs: the judge's verdicts, TRL's missing-EOS penalty,
and the pairs with a winner (or every sampled pair, marked decided or not).

A sample is ``(a, b, ref_side)``: two completions of one prompt and, where one of them was sampled
from the reference (xpo's paper form, and evaluation), its index (else None).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Sequence

from mlx_xpo_plugin.compute.rollout import Completion
from mlx_xpo_plugin.contracts import Verdict


@dataclass
class Pair:
    prompt_ids: list
    prompt_text: str
    chosen: Completion
    rejected: Completion
    ref_is_chosen: Optional[bool] = None  # which side is the reference sample, where there is one
    decided: bool = True  # False: a tie or an invalid verdict (chosen, rejected = the sample's order)


def apply_missing_eos_penalty(v: Verdict, a: Completion, b: Completion, penalty: Optional[float]) -> Verdict:
    """TRL's missing_eos_penalty on a pairwise verdict: the preference scores (1 - p, p), with p the
    judge's probability that b is better, lose `penalty` for a completion without EOS; the higher
    score wins. Invalid verdicts stay invalid."""
    if not penalty or v.invalid or a.eos == b.eos:
        return v
    if v.scores is not None:
        sa, sb = v.scores
    elif v.tie:
        sa = sb = 0.5
    else:
        conf = 1.0 if v.confidence is None else v.confidence
        p_b = conf if v.winner == 1 else 1.0 - conf
        sa, sb = 1.0 - p_b, p_b
    sa -= penalty * (not a.eos)
    sb -= penalty * (not b.eos)
    if sa == sb:
        return Verdict.tied(raw=v.raw, scores=(sa, sb))
    winner = 1 if sb > sa else 0
    conf = v.confidence  # the judge's confidence in its own winner: in the other one if flipped
    if conf is not None and v.winner is not None and winner != v.winner:
        conf = 1.0 - conf
    return Verdict(winner, conf, v.raw, False, (sa, sb))


def verdict_metrics(verdicts: Sequence[Verdict], seconds: float) -> dict:
    """Counts every judge reports: ``judge/pairs``, ``judge/invalid``, ``judge/ties``, ``judge/seconds``
    and, when pointwise scores are present, ``objective/scores_margin`` (mean |score_a - score_b|
    over the ``judge/scored_pairs`` pairs that have scores)."""
    m = {
        "judge/pairs": len(verdicts),
        "judge/invalid": sum(v.invalid for v in verdicts),
        "judge/ties": sum(v.tie for v in verdicts),
        "judge/seconds": seconds,
    }
    scored = [v.scores for v in verdicts if v.scores is not None]
    if scored:
        m["objective/scores_margin"] = sum(abs(a - b) for a, b in scored) / len(scored)
        m["judge/scored_pairs"] = len(scored)
    return m


def judge_samples(judge, texts: list, samples: list, penalty: Optional[float]) -> tuple[list, dict, float]:
    """One verdict per sample (missing-EOS penalty applied), the judge's numbers, and its seconds."""
    t0 = time.perf_counter()
    verdicts = judge.judge(texts, [(a.text, b.text) for a, b, _ in samples])
    if len(verdicts) != len(samples):
        raise RuntimeError(f"the judge returned {len(verdicts)} verdicts for {len(samples)} pairs")
    verdicts = [apply_missing_eos_penalty(v, a, b, penalty) for v, (a, b, _) in zip(verdicts, samples)]
    secs = time.perf_counter() - t0
    return verdicts, {**verdict_metrics(verdicts, secs), **judge.last_metrics}, secs


def keep_decided(prompts, samples: list, verdicts: list) -> list[Pair]:
    """The pairs the judge decided, as (chosen, rejected); ties and invalid verdicts are dropped."""
    pairs = []
    for pid, text, (a, b, ref_side), v in zip(prompts.ids, prompts.texts, samples, verdicts):
        if v.winner is None:
            continue
        chosen, rejected = (a, b) if v.winner == 0 else (b, a)
        pairs.append(Pair(pid, text, chosen, rejected, None if ref_side is None else v.winner == ref_side))
    return pairs


def every_pair(prompts, samples: list, verdicts: list, ties_to_policy: bool = False) -> list[Pair]:
    """Every sample as a Pair: the decided ones as (chosen, rejected), the others (ties, invalid
    verdicts) in the sample's order with ``decided=False``. With ``ties_to_policy`` a tie between
    a policy sample and a reference sample counts as a win of the policy sample (TRL's XPO:
    ``chosen = policy_score >= reference_score``)."""
    pairs = []
    for pid, text, (a, b, ref_side), v in zip(prompts.ids, prompts.texts, samples, verdicts):
        winner = v.winner
        if winner is None and v.tie and ties_to_policy and ref_side is not None:
            winner = 1 - ref_side
        if winner is None:
            ref_first = None if ref_side is None else ref_side == 0
            pairs.append(Pair(pid, text, a, b, ref_first, decided=False))
            continue
        chosen, rejected = (a, b) if winner == 0 else (b, a)
        pairs.append(Pair(pid, text, chosen, rejected, None if ref_side is None else winner == ref_side))
    return pairs


def completion_records(step: int, texts: list, samples: list, verdicts: list) -> list[dict]:
    """The completions.jsonl rows of one judged micro-batch."""
    return [
        {
            "step": step,
            "prompt": text,
            "completion_a": a.text,
            "completion_b": b.text,
            "eos_a": a.eos,
            "eos_b": b.eos,
            "winner": v.winner,
            "tie": v.tie,
            "invalid": v.invalid,
            "confidence": v.confidence,
            "chosen": None if v.winner is None else ("a" if v.winner == 0 else "b"),
            "b_from_reference": ref_side == 1,
        }
        for text, (a, b, ref_side), v in zip(texts, samples, verdicts)
    ]

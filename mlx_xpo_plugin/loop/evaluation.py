"""Evaluation: a policy sample against a reference sample per prompt, judged.

Reports the win-rate (wins / decided pairs), ties and invalid verdicts, and on the decided pairs
the configured DPO loss and the implicit-reward accuracy and margin (the same pair loss as in
training, without the exploration term). Invalid verdicts are counted as in training: ``invalid``
all of them, ``errors/<kind>`` the pairs the judge failed on (by the exception's class or the
endpoint's kind), with the reason of the last invalid answer (``invalid_example``) and the last
error's text (``last_error``) for the line a run prints. Runs in eval mode (no dropout).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from mlx_xpo_plugin.compute.rollout import sample_policy_and_reference
from mlx_xpo_plugin.loop.faults import error_count, invalid_example
from mlx_xpo_plugin.loop.losses import dpo_scores, reward_stats
from mlx_xpo_plugin.loop.pair_loss import pack_pairs, pair_loss, reference_logps
from mlx_xpo_plugin.loop.pairs import Pair
from mlx_xpo_plugin.loop.win_rate import error_kinds


def evaluate(trainer, prompts, max_batches: int = -1) -> dict:
    model = trainer.model
    was_training = model.training
    model.eval()
    try:
        return _evaluate(trainer, prompts, max_batches)
    finally:
        model.train(was_training)


def _evaluate(t, prompts, max_batches: int) -> dict:
    s, bs = t.settings, t.settings.batch_size
    n = len(prompts) if max_batches is None or max_batches < 0 else min(len(prompts), max_batches * bs)
    wins = losses = ties = invalid = 0
    errors, words = {}, {}
    cols = {"loss": [], "rewards/accuracies": [], "rewards/margins": []}
    beta, _ = t.schedule()
    for i in range(0, n, bs):
        batch = prompts.subset(range(i, min(n, i + bs)))
        samples = sample_policy_and_reference(t.model, t.tokenizer, t.reference, batch.ids, s.sampling)
        verdicts = t.judge.judge(batch.texts, [(p.text, r.text) for p, r in samples])
        judged = t.judge.last_metrics or {}
        for kind, count in error_kinds(judged, "judge/errors/").items():
            errors[f"errors/{kind}"] = errors.get(f"errors/{kind}", 0) + count
        example = invalid_example(verdicts, error_count(judged))
        if example is not None:
            words["invalid_example"] = example
        if error_count(judged) and getattr(t.judge, "last_error", None):
            words["last_error"] = t.judge.last_error
        pairs = []
        for pid, text, (p, r), v in zip(batch.ids, batch.texts, samples, verdicts):
            ties, invalid = ties + v.tie, invalid + v.invalid
            if v.winner is not None:
                wins, losses = wins + (v.winner == 0), losses + (v.winner == 1)
                pairs.append(Pair(pid, text, *((p, r) if v.winner == 0 else (r, p))))
        if pairs:
            inputs, targets, mask = pack_pairs(pairs)
            ref_tok = reference_logps(t.reference, inputs, targets, mask)
            res = pair_loss(
                t.model, inputs, targets, mask, ref_tok, mx.array([False] * len(pairs)), t.method, s, beta, 0.0
            )
            P = len(pairs)
            pol, ref = dpo_scores(res.policy, res.reference, res.counts, s.dpo_cpo_loss_type)
            rs = reward_stats(pol[:P], pol[P:], ref[:P], ref[P:], beta)
            cols["loss"].append(np.array(res.dpo))
            cols["rewards/accuracies"].append(np.array(rs["rewards/accuracies"]))
            cols["rewards/margins"].append(np.array(rs["rewards/margins"]))
    decided = wins + losses
    out = {
        "win_rate": wins / decided if decided else float("nan"),
        "wins": wins,
        "losses": losses,
        "ties": ties,
        "invalid": invalid,
        "pairs": wins + losses + ties + invalid,
        **dict(sorted(errors.items())),
        **words,
    }
    if cols["loss"]:
        out.update({k: float(np.concatenate(v).mean()) for k, v in cols.items()})
    return out

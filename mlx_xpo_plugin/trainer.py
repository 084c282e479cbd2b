"""The one online preference loop shared by Online DPO and XPO.

One optimizer step:
  for each of `gradient_accumulation_steps` micro-batches of `batch_size` prompts:
      sample two completions per prompt (token ids) -> judge -> keep pairs with a winner
  score every kept pair (completion tokens only), policy with gradient, reference without
  loss = sum over kept pairs of (L_DPO + L_XPO) / (number of kept pairs in the whole window)
  one optimizer update (none when no pair was kept; the step says so)
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map

from . import decode
from .errors import StopTraining
from .faults import Guard, JudgeFailure
from .judges.base import Verdict, verdict_metrics
from .losses import dpo_loss, dpo_scores, reward_stats, xpo_kl_bonus, xpo_kl_upstream, xpo_paper_term
from .metrics import JsonlLog, MetricsWindow, merge_step_metrics
from .reference import Reference
from .rollout import Completion, SamplingConfig, sample_completions
from .schedule import value_at_epoch
from .scoring import completion_logps, pack


@dataclass
class PromptSet:
    """Tokenised prompts (chat template applied) and their text for the judge."""

    ids: list
    texts: list

    def __len__(self):
        return len(self.ids)


@dataclass
class Pair:
    prompt_ids: list
    prompt_text: str
    chosen: Completion
    rejected: Completion
    ref_is_chosen: Optional[bool] = None  # xpo 'paper': which side is the reference sample


@dataclass
class LoopSettings:
    """What the loop needs, independent of where the values came from (CLI, YAML, Python)."""

    mode: str  # "xpo" | "online_dpo"
    iters: int
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    micro_batch_size: Optional[int] = 1  # pairs per scoring pass; None = the whole batch (as config.py)
    beta: Any = 0.1
    alpha: Any = 1e-5  # used by xpo only
    xpo_bonus: str = "kl"
    loss_type: str = "sigmoid"
    delta: float = 50.0
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_tokens=64))
    missing_eos_penalty: Optional[float] = None
    entropy_coef: float = 0.0
    steps_per_report: int = 10
    steps_per_eval: int = 200
    val_batches: int = 25
    save_every: int = 100
    log_completions_every: Optional[int] = None
    max_nonfinite_steps: int = 3
    max_judgeless_steps: Optional[int] = 10  # None: no limit
    seed: int = 0
    adapter_path: str = "adapters"
    progress: bool = True

    @property
    def uses_xpo(self) -> bool:
        return self.mode == "xpo"

    @property
    def paper_form(self) -> bool:
        return self.uses_xpo and self.xpo_bonus == "paper"


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


def step_seed(seed: int, step: int) -> int:
    """The sampling seed of one step (the same in an uninterrupted and a resumed run)."""
    return (seed * 1_000_003 + step) % (2**32)


class OnlineTrainer:
    def __init__(self, settings: LoopSettings, model: nn.Module, tokenizer, reference: Reference,
                 judge, optimizer, train_set: PromptSet, valid_set: Optional[PromptSet] = None,
                 training_callback=None, log: Callable[[str], None] = print):
        self.s = settings
        self.model, self.tokenizer, self.ref, self.judge = model, tokenizer, reference, judge
        self.opt, self.train_set, self.valid_set = optimizer, train_set, valid_set
        self.callback = training_callback
        # data parallel (mlx.launch): prompts sharded by rank, gradients summed over ranks
        self.group = mx.distributed.init()
        self.rank, self.world = self.group.rank(), self.group.size()
        self.log = log if self.rank == 0 else (lambda msg: None)
        self.step = 0
        self.position = 0  # prompts consumed so far (data order is derived from seed and epoch)
        self.window = MetricsWindow()
        self.nonfinite_run = 0
        self.stop_reason: Optional[str] = None
        self._interrupted = 0
        os.makedirs(settings.adapter_path, exist_ok=True)
        self.metrics_log = None
        self.completions_log = None
        self._value_and_grad = nn.value_and_grad(model, self._loss)
        self._last_val: dict = {}
        self.guard = Guard(self)  # wraps self.judge; judge failures, rollback (faults.py)

    # ------------------------------------------------------------------ data order

    @property
    def prompts_per_step(self) -> int:
        """Global prompts per optimizer step (all ranks together)."""
        return self.s.batch_size * self.s.gradient_accumulation_steps * self.world

    def _take_shard(self) -> list:
        """This rank's slice of the next global micro-batch (every rank advances the same order)."""
        idx = self._take(self.s.batch_size * self.world)
        return idx[self.rank * self.s.batch_size:(self.rank + 1) * self.s.batch_size]

    def _all_sum_grads(self, grads, loss_sum: float):
        """Sum gradients and loss over ranks in ONE message: every leaf packed into a flat buffer."""
        from mlx.utils import tree_flatten, tree_unflatten
        leaves = tree_flatten(grads)
        flat = mx.concatenate([v.reshape(-1).astype(mx.float32) for _, v in leaves] + [mx.array([loss_sum])])
        flat = self._all_sum(flat)
        out, i = [], 0
        for k, v in leaves:
            out.append((k, flat[i:i + v.size].reshape(v.shape).astype(v.dtype)))
            i += v.size
        summed = tree_unflatten(out)
        mx.eval(summed)
        return summed, float(flat[-1].item())

    def _all_sum(self, x):
        return x if self.world == 1 else mx.distributed.all_sum(x, group=self.group)

    @property
    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(len(self.train_set) / self.prompts_per_step))

    def _take(self, n: int) -> list:
        """The next n training prompt indices: a fresh seeded permutation per epoch."""
        out = []
        N = len(self.train_set)
        while len(out) < n:
            epoch, pos = divmod(self.position, N)
            perm = np.random.RandomState(self.s.seed + epoch).permutation(N)
            take = min(n - len(out), N - pos)
            out.extend(int(i) for i in perm[pos:pos + take])
            self.position += take
        return out

    @property
    def data_epoch(self) -> int:
        """The epoch (pass over the training prompts) of the current step's first prompt: the
        epoch the alpha/beta schedules follow (0 before the first step)."""
        if self.step < 1:
            return 0
        return max(0, self.position - self.prompts_per_step) // max(1, len(self.train_set))

    def current(self, schedule) -> float:
        """The value of an alpha/beta schedule for the current step's data epoch."""
        return value_at_epoch(schedule, self.data_epoch)

    # ------------------------------------------------------------------ sampling and judging

    def _rollout(self, prompt_ids: Sequence[list], paper: bool) -> list[tuple[Completion, Completion, Optional[int]]]:
        """Two completions per prompt. Returns (a, b, ref_side) with ref_side the index of the
        reference sample (paper form) or None."""
        cfg = self.s.sampling
        if not paper:
            both = sample_completions(self.model, self.tokenizer, prompt_ids, 2, cfg)
            return [(a, b, None) for a, b in both]
        P = len(prompt_ids)
        split = self.ref.rows_split(P, P) if decode.supports(self.model) else None
        if split is not None:  # one batch: policy rows, then reference rows (a fixed-shape batch)
            with split as both_policies:
                both = sample_completions(both_policies, self.tokenizer, list(prompt_ids) * 2, 1, cfg)
            pol, ref = both[:P], both[P:]
        else:
            pol = sample_completions(self.model, self.tokenizer, prompt_ids, 1, cfg)
            with self.ref.use() as ref_model:
                ref = sample_completions(ref_model, self.tokenizer, prompt_ids, 1, cfg)
        return [(p[0], r[0], 1) for p, r in zip(pol, ref)]

    def _judge(self, texts: list, triples: list) -> tuple[list[Verdict], float, dict]:
        t0 = time.perf_counter()
        verdicts = self.judge.judge(texts, [(a.text, b.text) for a, b, _ in triples])
        if len(verdicts) != len(triples):
            raise RuntimeError(f"the judge returned {len(verdicts)} verdicts for {len(triples)} pairs")
        verdicts = [apply_missing_eos_penalty(v, a, b, self.s.missing_eos_penalty)
                    for v, (a, b, _) in zip(verdicts, triples)]
        extra = dict(getattr(self.judge, "last_metrics", None) or {})
        return verdicts, time.perf_counter() - t0, extra

    def collect_pairs(self, idx: list, metrics: dict) -> list[Pair]:
        prompts = [self.train_set.ids[i] for i in idx]
        texts = [self.train_set.texts[i] for i in idx]
        t0 = time.perf_counter()
        triples = self._rollout(prompts, self.s.paper_form)
        metrics["time/rollout"] = metrics.get("time/rollout", 0.0) + time.perf_counter() - t0
        verdicts, secs, extra = self._judge(texts, triples)
        metrics["time/judge"] = metrics.get("time/judge", 0.0) + secs
        merge_step_metrics(metrics, {**verdict_metrics(verdicts, secs), **extra})
        comps = [c for a, b, _ in triples for c in (a, b)]
        metrics.setdefault("_eos", []).extend(c.eos for c in comps)
        metrics.setdefault("_gen_tokens", []).append(sum(len(c.tokens) for c in comps))
        pairs = []
        for pid, text, (a, b, ref_side), v in zip(prompts, texts, triples, verdicts):
            if v.winner is None:
                continue
            chosen, rejected = (a, b) if v.winner == 0 else (b, a)
            ref_is_chosen = None if ref_side is None else (v.winner == ref_side)
            pairs.append(Pair(pid, text, chosen, rejected, ref_is_chosen))
        self._maybe_log_completions(prompts, texts, triples, verdicts)
        return pairs

    # ------------------------------------------------------------------ scoring and loss

    def _batch(self, pairs: list[Pair]):
        prompts = [p.prompt_ids for p in pairs] * 2
        comps = [p.chosen.tokens for p in pairs] + [p.rejected.tokens for p in pairs]
        return pack(prompts, comps, pad_id=0)

    def _reference_logps(self, inputs, targets, mask):
        """Per-token completion log-probs of the reference ([rows, T], no gradient)."""
        with self.ref.use() as ref_model:
            tok = completion_logps(ref_model, inputs, targets, mask).tokens
            mx.eval(tok)
        return mx.stop_gradient(tok)

    def _loss(self, model, inputs, targets, mask, ref_tok, ref_flags, norm, beta, alpha):
        want_entropy = self.s.entropy_coef > 0
        kl_form = self.s.uses_xpo and self.s.xpo_bonus == "kl" and alpha > 0
        sc = completion_logps(model, inputs, targets, mask, with_entropy=want_entropy,
                              temperature=self.s.sampling.temperature if kl_form else None)
        s, ref_s, ent = sc.sum, ref_tok.sum(axis=-1), sc.entropy
        P = s.shape[0] // 2
        counts = mx.maximum(sc.counts, 1.0)
        pol, ref = dpo_scores(s, ref_s, counts, self.s.loss_type)
        pol_c, pol_r, ref_c, ref_r = pol[:P], pol[P:], ref[:P], ref[P:]
        l_dpo = dpo_loss(pol_c, pol_r, ref_c, ref_r, beta, self.s.loss_type, self.s.delta)
        if not self.s.uses_xpo:
            l_xpo = mx.zeros_like(l_dpo)
        elif self.s.paper_form:
            pol_yref = mx.where(ref_flags, s[:P], s[P:])
            l_xpo = xpo_paper_term(pol_yref, alpha)
        elif self.s.xpo_bonus == "kl_upstream":
            l_xpo = -xpo_kl_upstream(s[:P], s[P:], ref_s[:P], ref_s[P:], alpha)
        else:
            l_xpo = -xpo_kl_bonus(sc.tokens, ref_tok, sc.mask, alpha, sc.tempered)
        total = l_dpo + l_xpo
        if want_entropy:
            tok_ent = ent / counts
            total = total - self.s.entropy_coef * 0.5 * (tok_ent[:P] + tok_ent[P:])
        loss = total.sum() / norm
        aux = (l_dpo, l_xpo, s, ref_s, counts, ent)
        return loss, aux

    def _micro_batches(self, pairs: list[Pair]):
        mb = self.s.micro_batch_size or max(1, self.s.batch_size)
        for i in range(0, len(pairs), mb):
            yield pairs[i:i + mb]

    def train_step(self, metrics: dict) -> Optional[float]:
        """One optimizer step; returns the loss or None when no update was made."""
        pairs = []
        for _ in range(self.s.gradient_accumulation_steps):
            pairs.extend(self.collect_pairs(self._take_shard(), metrics))
        beta, alpha = self.current(self.s.beta), (self.current(self.s.alpha) if self.s.uses_xpo else 0.0)
        metrics.update(alpha=alpha, beta=beta, temperature=self.s.sampling.temperature,
                       max_completion_length=self.s.sampling.max_tokens)
        n_valid = int(self._all_sum(mx.array(len(pairs))).item())
        metrics["pairs/valid"] = n_valid
        if n_valid == 0:
            self.log(f"step {self.step}: no valid pair ({int(metrics.get('judge/invalid', 0))} invalid, "
                     f"{int(metrics.get('judge/ties', 0))} ties): no update")
            self.guard.no_valid_pair(metrics)
            return None
        self.guard.valid_pair()
        norm = float(n_valid)  # the loss is averaged over valid pairs of the whole (global) window
        grads, loss_sum, stats = None, 0.0, []
        t_ref = t_pol = 0.0
        for mb in self._micro_batches(pairs):
            inputs, targets, mask = self._batch(mb)
            t0 = time.perf_counter()
            ref_s = self._reference_logps(inputs, targets, mask)
            t1 = time.perf_counter()
            flags = mx.array([bool(p.ref_is_chosen) for p in mb])
            (loss, aux), g = self._value_and_grad(self.model, inputs, targets, mask, ref_s, flags,
                                                  norm, beta, alpha)
            mx.eval(loss, g, aux)
            t_ref += t1 - t0
            t_pol += time.perf_counter() - t1
            grads = g if grads is None else tree_map(lambda x, y: x + y, grads, g)
            loss_sum += loss.item()
            stats.append((aux, mb))
        if self.world > 1:
            if grads is None:  # this rank had no valid pair: contribute zeros
                grads = tree_map(mx.zeros_like, self.model.trainable_parameters())
            grads, loss_sum = self._all_sum_grads(grads, loss_sum)
        metrics["time/reference"] = t_ref
        metrics["time/policy"] = t_pol
        if stats:
            self._pair_metrics(stats, beta, metrics)
        metrics["loss"] = loss_sum
        if not math.isfinite(loss_sum):
            self.nonfinite_run += 1
            metrics["train/nonfinite_steps"] = 1
            self.log(f"step {self.step}: non-finite loss ({loss_sum}); update skipped "
                     f"({self.nonfinite_run}/{self.s.max_nonfinite_steps} in a row)")
            if self.nonfinite_run >= self.s.max_nonfinite_steps:
                self.stop_reason = (f"{self.nonfinite_run} consecutive non-finite losses; "
                                    "stopped, the last good checkpoint is kept")
            return None
        self.nonfinite_run = 0
        t0 = time.perf_counter()
        self.opt.update(self.model, grads)
        mx.eval(self.model.parameters(), self.opt.state)
        metrics["time/optimizer"] = time.perf_counter() - t0
        return loss_sum

    def _pair_metrics(self, stats, beta, metrics):
        cols = {k: [] for k in ("loss/dpo", "loss/xpo", "rewards/chosen", "rewards/rejected",
                                "rewards/margins", "rewards/accuracies", "logps/chosen",
                                "logps/rejected", "objective/kl", "objective/entropy")}
        for (l_dpo, l_xpo, s, ref_s, counts, _), mb in stats:
            P = len(mb)
            pc, pr, rc, rr = s[:P], s[P:], ref_s[:P], ref_s[P:]
            pol, ref = dpo_scores(s, ref_s, counts, self.s.loss_type)
            for k, v in reward_stats(pol[:P], pol[P:], ref[:P], ref[P:], beta).items():
                cols[k].append(np.array(v))
            cols["loss/dpo"].append(np.array(l_dpo))
            cols["loss/xpo"].append(np.array(l_xpo))
            cols["logps/chosen"].append(np.array(pc))
            cols["logps/rejected"].append(np.array(pr))
            kl = np.array(s - ref_s)
            cols["objective/kl"].append(0.5 * (kl[:P] + kl[P:]))
            cols["objective/entropy"].append(-0.5 * (np.array(pc) + np.array(pr)))
        for k, v in cols.items():
            metrics[k] = float(np.concatenate(v).mean())
        metrics["exploration_bonus"] = -metrics["loss/xpo"]

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, prompts: PromptSet, max_batches: int = -1) -> dict:
        """Policy sample vs reference sample on `prompts`, judged: win-rate, ties, invalid,
        and the DPO loss / implicit-reward accuracy of the judged pairs (in eval mode: no dropout)."""
        was_training = self.model.training
        self.model.eval()
        try:
            return self._evaluate(prompts, max_batches)
        finally:
            self.model.train(was_training)

    def _evaluate(self, prompts: PromptSet, max_batches: int) -> dict:
        n = len(prompts) if max_batches is None or max_batches < 0 else min(len(prompts), max_batches * self.s.batch_size)
        wins = losses = ties = invalid = 0
        dpo_losses, accs, margins = [], [], []
        beta = self.current(self.s.beta)
        for i in range(0, n, self.s.batch_size):
            ids = prompts.ids[i:min(n, i + self.s.batch_size)]
            texts = prompts.texts[i:min(n, i + self.s.batch_size)]
            triples = self._rollout(ids, paper=True)  # (policy sample, reference sample, 1)
            verdicts = self.judge.judge(texts, [(p.text, r.text) for p, r, _ in triples])
            pairs = []
            for pid, text, (p, r, _), v in zip(ids, texts, triples, verdicts):
                if v.tie:
                    ties += 1
                elif v.invalid:
                    invalid += 1
                else:
                    wins += v.winner == 0
                    losses += v.winner == 1
                    c, rj = (p, r) if v.winner == 0 else (r, p)
                    pairs.append(Pair(pid, text, c, rj))
            if pairs:
                inputs, targets, mask = self._batch(pairs)
                ref_s = self._reference_logps(inputs, targets, mask).sum(axis=-1)
                sc = completion_logps(self.model, inputs, targets, mask)
                P = len(pairs)
                pol, ref = dpo_scores(sc.sum, ref_s, mx.maximum(sc.counts, 1.0), self.s.loss_type)
                dpo_losses.append(np.array(dpo_loss(pol[:P], pol[P:], ref[:P], ref[P:], beta,
                                                    self.s.loss_type, self.s.delta)))
                rs = reward_stats(pol[:P], pol[P:], ref[:P], ref[P:], beta)
                accs.append(np.array(rs["rewards/accuracies"]))
                margins.append(np.array(rs["rewards/margins"]))
        decided = wins + losses
        out = {"win_rate": wins / decided if decided else float("nan"), "wins": wins, "losses": losses,
               "ties": ties, "invalid": invalid, "pairs": wins + losses + ties + invalid}
        if dpo_losses:
            out.update({"loss": float(np.concatenate(dpo_losses).mean()),
                        "rewards/accuracies": float(np.concatenate(accs).mean()),
                        "rewards/margins": float(np.concatenate(margins).mean())})
        return out

    # ------------------------------------------------------------------ logging and saving

    def _maybe_log_completions(self, prompts, texts, triples, verdicts):
        every = self.s.log_completions_every or self.s.steps_per_report
        if self.completions_log is None or (self.step % every) != 0:
            return
        for text, (a, b, ref_side), v in zip(texts, triples, verdicts):
            rec = {"step": self.step, "prompt": text, "completion_a": a.text, "completion_b": b.text,
                   "eos_a": a.eos, "eos_b": b.eos, "winner": v.winner, "tie": v.tie,
                   "invalid": v.invalid, "confidence": v.confidence,
                   "chosen": None if v.winner is None else ("a" if v.winner == 0 else "b"),
                   "b_from_reference": ref_side == 1}
            self.completions_log.write(rec)
            if self.callback is not None and hasattr(self.callback, "on_completions"):
                self.callback.on_completions(rec)

    def save(self, final: bool = False):
        """Adapters (atomically) plus a resumable checkpoint of the loop's state."""
        if self.rank == 0:
            from .checkpoint_state import save_checkpoint
            save_checkpoint(self, final=final)

    def _report(self, metrics_row: dict, pbar):
        row = {"step": self.step, **metrics_row}
        if self.metrics_log is not None:
            self.metrics_log.write(row)
        if self.callback is not None and self.rank == 0:
            self.callback.on_train_loss_report(
                {"iteration": self.step, "train_loss": row.get("loss"), **row})
        if pbar is not None:
            pbar.set_postfix({"loss": f"{row.get('loss', float('nan')):.4f}",
                              "acc": f"{row.get('rewards/accuracies', float('nan')):.2f}",
                              "bonus": f"{row.get('exploration_bonus', 0.0):.2e}"})

    def _validate(self):
        if self.rank != 0 or self.valid_set is None or len(self.valid_set) == 0:
            return
        t0 = time.perf_counter()
        res = self.guard.validate(lambda: self.evaluate(self.valid_set, self.s.val_batches))
        if res is None:  # the judge raised: the run stops (faults.Guard.validate)
            return
        row = {"step": self.step, **{f"val_{k}": v for k, v in res.items()},
               "val_seconds": time.perf_counter() - t0}
        self._last_val = row
        if self.metrics_log is not None:
            self.metrics_log.write(row)
        if self.callback is not None:
            self.callback.on_val_loss_report({"iteration": self.step, "val_loss": res.get("loss"), **row})
        self.log(f"step {self.step}: validation win-rate vs reference {res['win_rate']:.3f} "
                 f"({res['wins']}-{res['losses']}, {res['ties']} ties, {res['invalid']} invalid)")

    # ------------------------------------------------------------------ the loop

    def _on_signal(self, signum, frame):
        self._interrupted += 1
        if self._interrupted > 1:  # files are written atomically: the last checkpoint stays intact
            sys.stderr.write(f"\n{signal.Signals(signum).name} again: exiting now; the last saved "
                             "checkpoint is kept\n")
            sys.stderr.flush()
            os._exit(130)
        if self.rank == 0:  # stderr, flushed: seen at once even when stdout is piped to a file
            sys.stderr.write(f"\n{signal.Signals(signum).name}: finishing this step, then saving a "
                             "checkpoint (press again to quit at once)\n")
            sys.stderr.flush()

    def train(self, resume_state: Optional[dict] = None) -> dict:
        from tqdm import tqdm
        resumed = resume_state is not None
        if resumed:
            from .checkpoint_state import restore
            restore(self, resume_state)
        if self.rank == 0:
            self.metrics_log = JsonlLog(os.path.join(self.s.adapter_path, "metrics.jsonl"),
                                        truncate_after_step=self.step if resumed else None)
            self.completions_log = JsonlLog(os.path.join(self.s.adapter_path, "completions.jsonl"),
                                            truncate_after_step=self.step if resumed else None)
        old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                old[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread
                pass
        pbar = tqdm(total=self.s.iters, initial=self.step, desc=self.s.mode, unit="step",
                    disable=not self.s.progress or self.rank != 0, dynamic_ncols=True, file=sys.stderr)
        try:
            if not resumed:
                self._validate()  # the baseline: step 0, before any update
            while self.step < self.s.iters and not self._interrupted and not self.stop_reason:
                self.guard.begin_step()
                self.step += 1
                # each step's randomness is a function of (seed, step): resuming needs no RNG state
                mx.random.seed(step_seed(self.s.seed, self.step) + 7919 * self.rank)
                mx.reset_peak_memory()
                t0 = time.perf_counter()
                metrics: dict = {}
                try:
                    loss = self.train_step(metrics)
                except StopTraining as e:
                    self.guard.roll_back_step()  # the step made no update: resume redoes it
                    self.stop_reason = f"stopped by the judge ({e or 'q'})"
                    break
                except JudgeFailure as e:  # no update was made: back to the step's start
                    self.guard.judge_crashed(e)
                    break
                dt = time.perf_counter() - t0
                eos = metrics.pop("_eos", [])
                gen_tokens = sum(metrics.pop("_gen_tokens", []))
                metrics.update({
                    "step_seconds": dt, "tokens_per_second": gen_tokens / dt if dt > 0 else 0.0,
                    "peak_memory_gb": mx.get_peak_memory() / 1e9,
                    "learning_rate": float(self.opt.learning_rate.item() if isinstance(self.opt.learning_rate, mx.array) else self.opt.learning_rate),
                    "val/contain_eos_token": float(np.mean(eos)) if eos else 0.0,
                    "time/other": dt - sum(metrics.get(k, 0.0) for k in (
                        "time/rollout", "time/judge", "time/reference", "time/policy", "time/optimizer")),
                })
                if loss is None:
                    metrics.setdefault("train/no_update_steps", 1)
                pair_keys = {k for k in metrics if k.startswith(("rewards/", "logps/", "loss/", "objective/"))} | {"loss", "exploration_bonus"}
                self.window.add({k: v for k, v in metrics.items() if k not in pair_keys})
                self.window.add({k: metrics[k] for k in pair_keys if k in metrics},
                                weight=metrics.get("pairs/valid", 0))
                pbar.update(1)
                if self.step % self.s.steps_per_report == 0 or self.step == self.s.iters:
                    self._report(self.window.report(), pbar)
                if self.step % self.s.steps_per_eval == 0 or self.step == self.s.iters:
                    self._validate()
                if self.step % self.s.save_every == 0 and self.step < self.s.iters:
                    self.save()
            if self.window.pending:  # steps since the last report (e.g. interrupted mid-window)
                self._report(self.window.report(), None)
            # still under our handlers: a Ctrl-C during this save exits at once, and the previous
            # checkpoint survives because every file is replaced atomically
            self.guard.before_final_save()
            self.save(final=self.step >= self.s.iters)
        finally:
            pbar.close()
            for sig, h in old.items():
                signal.signal(sig, h)
        return {**self._last_val, "step": self.step, "interrupted": bool(self._interrupted),
                "stop_reason": self.stop_reason}

"""The online preference loop shared by Online DPO and XPO.

One optimizer step (:meth:`OnlineTrainer.train_step`), for each of `gradient_accumulation_steps`
micro-batches of `batch_size` prompts: take prompts -> sample two completions per prompt (the
method's rollout) -> judge -> the method's training pairs (online DPO: the decided ones; XPO:
every sampled pair, marked decided or not); then score them (policy with gradient, reference
without; a judge that declares ``concurrent`` answers in a thread while the reference pass
scores the samples: loop/overlap.py), loss = pair_loss.total summed over the step's pairs (the
DPO loss averaged over the decided pairs, the exploration term over every scored pair, all
processes together), one optimizer update (none when no pair of the step was decided).

The method (``loop.method.OnlineDPO`` or ``xpo_trainer.XPO``) decides how a pair is
sampled, which pairs are scored, the alpha schedule and the exploration term. The loop's state
that a checkpoint keeps is one :class:`.checkpoints.LoopState`.
"""

from __future__ import annotations

import math
import os
import time
from fractions import Fraction
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

from mlx_xpo_plugin.contracts import as_judge
from mlx_xpo_plugin.errors import StopTraining
from mlx_xpo_plugin.loop.checkpoints import LoopState, save_checkpoint
from mlx_xpo_plugin.loop.evaluation import evaluate
from mlx_xpo_plugin.loop.faults import Guard, JudgeFailure, error_count, peer_lost_in
from mlx_xpo_plugin.loop.metrics import merge_step_metrics
from mlx_xpo_plugin.loop.overlap import ReferenceRows, judge_while
from mlx_xpo_plugin.loop.pair_loss import PairLoss, pack_pairs, pair_loss, pair_metrics, reference_logps, total
from mlx_xpo_plugin.loop.pairs import completion_records, judge_samples
from mlx_xpo_plugin.loop.prompts import PromptOrder, PromptSet
from mlx_xpo_plugin.loop.run_loop import run_loop
from mlx_xpo_plugin.loop.schedule import get_current_alpha
from mlx_xpo_plugin.loop.share import first_said, from_rank0, stop_together

__all__ = ["OnlineTrainer", "PromptSet"]


class OnlineTrainer:
    """The loop's parts: ``settings`` (loop/settings.py: LoopSettings), the ``method``
    (loop.method.OnlineDPO or xpo_trainer.XPO), the policy ``model`` and its
    ``tokenizer``, the frozen ``reference`` (reference.Reference), a pairwise ``judge`` (named
    ``judge_name`` in messages), an mlx ``optimizer`` and the prompts; ``fingerprint`` and
    ``config`` are recorded in every checkpoint (checkpoints.py: what a resume must match)."""

    def __init__(
        self,
        settings,
        method,
        model: nn.Module,
        tokenizer,
        reference,
        judge,
        optimizer,
        train_set: PromptSet,
        valid_set: Optional[PromptSet] = None,
        training_callback=None,
        log: Callable[[str], None] = print,
        *,
        judge_name: Optional[str] = None,
        fingerprint: Optional[dict] = None,
        config: Optional[dict] = None,
    ):
        self.settings, self.method = settings, method
        self.model, self.tokenizer, self.reference = model, tokenizer, reference
        self.judge = as_judge(judge)
        self.opt, self.train_set, self.valid_set = optimizer, train_set, valid_set
        self.callback = training_callback
        self.fingerprint, self.config = fingerprint, config
        self.group = mx.distributed.init()  # data parallel under mlx.launch
        self.rank, self.world = self.group.rank(), self.group.size()
        self.log = log if self.rank == 0 else (lambda msg: None)
        self.state = LoopState()
        self.order = PromptOrder(len(train_set), settings.seed, settings.batch_size, self.rank, self.world, self.state)
        self.stop_reason: Optional[str] = None
        self.stop_requests = 0  # Ctrl-C / SIGTERM: finish the step, save, stop
        self.completions_log = None
        self.reference_rows: Optional[ReferenceRows] = None  # a concurrent judge's step (overlap.py)
        if self.rank == 0:  # data parallel: the run's files are process 0's
            os.makedirs(settings.adapter_path, exist_ok=True)
        self._value_and_grad = nn.value_and_grad(model, self._loss)
        self.guard = Guard(self, judge_name)  # wraps the judge: judge failures and rollbacks (faults.py)

    @property
    def step(self) -> int:
        return self.state.step

    @step.setter
    def step(self, value: int) -> None:
        self.state.step = value

    def schedule(self) -> tuple[float, float]:
        """(beta, alpha) of the current step: :func:`.schedule.get_current_alpha` with
        steps_per_epoch = prompts / prompts per step (all processes), i.e. the data epoch of the
        step's first prompt."""
        s = self.settings
        per_step = s.batch_size * s.gradient_accumulation_steps * self.world
        spe = Fraction(max(1, len(self.train_set)), per_step)
        return tuple(get_current_alpha(self.step, s.iters, x, spe) for x in (s.beta, self.method.alpha_schedule))

    @property
    def pairs_per_pass(self) -> int:
        """Pairs per forward pass of the scoring (`micro_batch_size`, default `batch_size`)."""
        return self.settings.micro_batch_size or max(1, self.settings.batch_size)

    # ------------------------------------------------------------------ one step

    def train_step(self, metrics: dict) -> Optional[float]:
        """One optimizer step; returns the loss, or None when no update was made."""
        s = self.settings
        self.order.begin_step()
        self.reference_rows = ReferenceRows(self.reference, self.pairs_per_pass) if self.judge.concurrent else None
        pairs, failed = [], None
        try:
            for _ in range(s.gradient_accumulation_steps):
                pairs += self.collect_pairs(self.order.take(), metrics)  # sample -> judge -> keep
        except (JudgeFailure, StopTraining) as e:
            if self.world == 1:
                raise
            failed = e  # data parallel: every process learns it at the step's first sum
        beta, alpha = self.schedule()
        metrics.update(alpha=alpha, beta=beta, temperature=s.temperature, max_completion_length=s.max_completion_length)
        local = [sum(p.decided for p in pairs), len(pairs), int(metrics.get("judge/pairs", 0)), error_count(metrics)]
        sums = [int(x) for x in self._all_sum(mx.array([*local, int(failed is not None)])).tolist()]
        if sums[-1]:
            stop_together(failed)  # raises the first failing process's error on every process
        n_valid, n_scored, n_pairs, n_errors = sums[:-1]
        metrics["pairs/valid"], metrics["pairs/scored"] = n_valid, n_scored
        if n_errors and self.world > 1:  # the reason of an error on any process, for process 0's line
            self.judge.last_error = first_said(self.judge.last_error if error_count(metrics) else None)
        self.guard.judged(n_pairs, n_errors)
        errors = self.guard.error_line(n_pairs, n_errors, metrics)
        if n_valid == 0:
            counts = self.guard.verdict_counts(metrics, n_pairs, n_errors)
            self.log(f"step {self.step}: no valid pair ({counts}): no update")
            self.guard.no_valid_pair(metrics, n_pairs, n_errors)
            return None
        if errors:
            self.log(f"step {self.step}: the judge failed on {n_errors} of {n_pairs} pairs ({errors})")
        self.guard.valid_pair()
        grads, loss_sum, results = self.score_and_differentiate(pairs, (n_valid, n_scored), beta, alpha, metrics)
        if results:
            metrics.update(pair_metrics(results, beta, s.dpo_cpo_loss_type))
        metrics["loss"] = loss_sum
        if not math.isfinite(loss_sum):
            return self.skip_nonfinite(loss_sum, metrics)
        self.state.nonfinite_run = 0
        t0 = time.perf_counter()
        self.opt.update(self.model, grads)
        mx.eval(self.model.parameters(), self.opt.state)
        self.state.updates += 1
        metrics["time/optimizer"] = time.perf_counter() - t0
        return loss_sum

    def collect_pairs(self, idx: list, metrics: dict) -> list:
        """Sample two completions per prompt, judge them, keep the method's training pairs."""
        prompts = self.train_set.subset(idx)
        t0 = time.perf_counter()
        samples = self.method.rollout(self.model, self.tokenizer, self.reference, prompts.ids, self.settings.sampling)
        metrics["time/rollout"] = metrics.get("time/rollout", 0.0) + time.perf_counter() - t0
        verdicts, judge_metrics, secs = self.judge_pairs(prompts, samples, metrics)
        metrics["time/judge"] = metrics.get("time/judge", 0.0) + secs
        merge_step_metrics(metrics, judge_metrics)
        comps = [c for a, b, _ in samples for c in (a, b)]
        metrics.setdefault("_eos", []).extend(c.eos for c in comps)
        metrics.setdefault("_gen_tokens", []).append(sum(len(c.tokens) for c in comps))
        self.log_completions(prompts.texts, samples, verdicts)
        return self.method.training_pairs(prompts, samples, verdicts)

    def judge_pairs(self, prompts, samples: list, metrics: dict) -> tuple[list, dict, float]:
        """The judge's verdicts on the samples (pairs.judge_samples). A concurrent judge answers
        in a thread while the reference pass scores the samples (loop/overlap.py); the seconds
        both ran at once are ``time/overlapped``."""

        def judge():
            return judge_samples(self.judge, prompts.texts, samples, self.settings.missing_eos_penalty)

        if self.reference_rows is None:
            return judge()
        passes = self.reference_rows.add(prompts, samples)

        def reference_pass(judging):
            t0 = time.perf_counter()
            self.reference_rows.score_ahead(passes, judging)
            metrics["time/reference"] = metrics.get("time/reference", 0.0) + time.perf_counter() - t0

        out, both = judge_while(judge, reference_pass)
        metrics["time/overlapped"] = metrics.get("time/overlapped", 0.0) + both
        return out

    def reference_tokens(self, pairs, inputs, targets, mask) -> mx.array:
        """The reference's token log-probs of a micro-batch of pairs: a concurrent judge's step
        takes them from its ReferenceRows, any other step scores them now."""
        rows = self.reference_rows.tokens(pairs, mask) if self.reference_rows is not None else None
        return rows if rows is not None else reference_logps(self.reference, inputs, targets, mask)

    def score_and_differentiate(self, pairs, n_pairs: tuple, beta: float, alpha: float, metrics: dict):
        """Gradients of the step's loss (pair_loss.total; ``n_pairs`` = (decided, scored) pairs of
        all processes) over this process's pairs, in micro-batches of `micro_batch_size` pairs,
        averaged over processes (scaled so that the result is the sum)."""
        mb = self.pairs_per_pass
        norm = tuple(n / self.world for n in n_pairs)  # nn.average_gradients divides by the world size
        grads, loss_sum, results, t_ref, t_pol = None, 0.0, [], 0.0, 0.0
        for i in range(0, len(pairs), mb):
            batch = pairs[i : i + mb]
            inputs, targets, mask = pack_pairs(batch)
            t0 = time.perf_counter()
            ref_tok = self.reference_tokens(batch, inputs, targets, mask)
            t1 = time.perf_counter()
            flags = mx.array([bool(p.ref_is_chosen) for p in batch])
            decided = mx.array([p.decided for p in batch])
            (loss, aux), g = self._value_and_grad(
                self.model, inputs, targets, mask, ref_tok, flags, decided, norm, beta, alpha
            )
            mx.eval(loss, g, aux)
            t_ref, t_pol = t_ref + t1 - t0, t_pol + time.perf_counter() - t1
            grads = g if grads is None else tree_map(lambda x, y: x + y, grads, g)
            loss_sum += loss.item() / self.world
            results.append(PairLoss(*aux))
        if self.world > 1:
            if grads is None:  # no valid pair on this process: contribute zeros
                grads = tree_map(mx.zeros_like, self.model.trainable_parameters())
            grads = nn.average_gradients(grads, group=self.group)
            loss_sum = float(self._all_sum(mx.array(loss_sum)).item())
        metrics["time/reference"] = metrics.get("time/reference", 0.0) + t_ref
        metrics["time/policy"] = t_pol
        return grads, loss_sum, results

    def _loss(self, model, inputs, targets, mask, ref_tok, ref_is_chosen, decided, norm, beta, alpha):
        s = self.settings
        res = pair_loss(model, inputs, targets, mask, ref_tok, ref_is_chosen, self.method, s, beta, alpha, decided)
        return total(res, s.entropy_coef, *norm).sum(), tuple(res)

    def skip_nonfinite(self, loss_sum: float, metrics: dict) -> None:
        """No update for a non-finite loss; enough of them in a row stop the run."""
        self.state.nonfinite_run += 1
        limit = self.settings.max_nonfinite_steps
        metrics["train/nonfinite_steps"] = 1
        self.log(
            f"step {self.step}: non-finite loss ({loss_sum}); update skipped "
            f"({self.state.nonfinite_run}/{limit} in a row)"
        )
        if self.state.nonfinite_run >= limit:
            self.stop_reason = (
                f"{self.state.nonfinite_run} consecutive non-finite losses; stopped, the last good checkpoint is kept"
            )
        return None

    def _all_sum(self, x):
        return x if self.world == 1 else mx.distributed.all_sum(x, group=self.group)

    # ------------------------------------------------------------------ around the steps

    def evaluate(self, prompts: PromptSet, max_batches: int = -1) -> dict:
        """Policy sample vs reference sample on `prompts`, judged (see evaluation.py)."""
        return evaluate(self, prompts, max_batches)

    def validate(self) -> Optional[dict]:
        """Win-rate against the reference on the validation prompts (process 0; None if none).
        Data parallel: a stop it leads to (the judge failed or asked to stop) is every process's."""
        if self.valid_set is None or len(self.valid_set) == 0:
            return None
        res = None
        if self.rank == 0:
            res = self.guard.validate(lambda: self.evaluate(self.valid_set, self.settings.val_batches))
        if self.world > 1:
            self.stop_reason, self.guard.status = from_rank0(lambda: [self.stop_reason, self.guard.status])
        return res

    def log_completions(self, texts, samples, verdicts) -> None:
        every = self.settings.log_completions_every or self.settings.steps_per_report
        if self.completions_log is None or self.step % every != 0:
            return
        for rec in completion_records(self.step, texts, samples, verdicts):
            self.completions_log.write(rec)
            if self.callback is not None and hasattr(self.callback, "on_completions"):
                self.callback.on_completions(rec)

    def save(self, final: bool = False) -> None:
        """Adapters (atomically) plus a resumable checkpoint of the loop's state, written by
        process 0; data parallel: a save that fails there ends every process with its status."""
        with peer_lost_in(self.step + 1, self.rank, self.world):  # this step's checkpoint is written: the next is lost
            from_rank0(lambda: save_checkpoint(self, final=final))

    def train(self, resume_state: Optional[dict] = None) -> dict:
        """Run the steps (see run_loop.py); returns the last validation and how the run ended."""
        return run_loop(self, resume_state)

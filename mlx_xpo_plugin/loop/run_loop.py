"""The steps of a run around :meth:`.trainer.OnlineTrainer.train_step`: resume, the per-step
seed, metrics reports, validation, checkpoints, the progress bar and Ctrl-C.

Each step's randomness is a function of (seed, step, process): a resumed run needs no RNG state.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Optional

import mlx.core as mx
import numpy as np

from mlx_xpo_plugin.errors import StopTraining
from mlx_xpo_plugin.exits import Exit
from mlx_xpo_plugin.loop.checkpoints import restore
from mlx_xpo_plugin.loop.faults import JudgeFailure, PeerLost, peer_lost_in
from mlx_xpo_plugin.loop.metrics import JsonlLog, MetricsWindow, is_pair_metric
from mlx_xpo_plugin.loop.win_rate import validation_line

PHASES = ("time/rollout", "time/judge", "time/reference", "time/policy", "time/optimizer")


def step_seed(seed: int, step: int) -> int:
    """The sampling seed of one step (the same in an uninterrupted and a resumed run)."""
    return (seed * 1_000_003 + step) % (2**32)


#: seconds a process that lost a peer may take to report it after the launcher's SIGTERM
GRACE_S = 10


def _end_within_grace(signum, frame) -> None:
    signal.signal(signal.SIGALRM, signal.SIG_DFL)  # its default action ends the process
    signal.alarm(GRACE_S)


class GracefulStop:
    """SIGINT/SIGTERM: the first asks the trainer to stop after this step (``stop_requests``);
    the second exits at once (every file is written atomically: the last checkpoint stays).
    Leaving with :class:`PeerLost`, a SIGTERM ends the process only :data:`GRACE_S` seconds later."""

    def __init__(self, trainer):
        self.t, self.say, self._old = trainer, trainer.rank == 0, {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, exc_type, exc, tb):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        lost_peer = exc_type is not None and issubclass(exc_type, PeerLost)
        if lost_peer and signal.SIGTERM in self._old and hasattr(signal, "alarm"):  # POSIX
            # mlx.launch terminates every process once one has failed; this one is stopping
            # already, and has yet to say why (commands/peers.py): it gets GRACE_S seconds for that
            signal.signal(signal.SIGTERM, _end_within_grace)

    def _on_signal(self, signum, frame):
        self.t.stop_requests += 1
        name = signal.Signals(signum).name
        if self.t.stop_requests > 1:
            sys.stderr.write(f"\n{name} again: exiting now; the last saved checkpoint is kept\n")
            sys.stderr.flush()
            os._exit(Exit.INTERRUPTED)
        if self.say:  # stderr, flushed: seen at once even when stdout is piped to a file
            sys.stderr.write(f"\n{name}: finishing this step, then saving a checkpoint (press again to quit at once)\n")
            sys.stderr.flush()


def stop_asked(trainer) -> bool:
    """Whether Ctrl-C / SIGTERM asked to stop. Data parallel: whether any process was asked (one
    sum of a flag between steps), so that every process stops after the same step, as interrupted,
    when only one machine's process got the signal."""
    if trainer.world == 1:
        return bool(trainer.stop_requests)
    flag = mx.array(int(trainer.stop_requests > 0))
    with peer_lost_in(trainer.step + 1, trainer.rank, trainer.world):  # before the next step: it is the one lost
        asked = int(mx.distributed.all_sum(flag, group=trainer.group).item())
    if not asked:
        return False
    trainer.stop_requests = max(trainer.stop_requests, 1)
    return True


def step_row(metrics: dict, seconds: float, learning_rate) -> dict:
    """The step's numbers besides the pair metrics: time, throughput, memory, EOS rate."""
    eos = metrics.pop("_eos", [])
    gen_tokens = sum(metrics.pop("_gen_tokens", []))
    lr = learning_rate.item() if isinstance(learning_rate, mx.array) else learning_rate
    metrics.update(
        {
            "step_seconds": seconds,
            "tokens_per_second": gen_tokens / seconds if seconds > 0 else 0.0,
            "peak_memory_gb": mx.get_peak_memory() / 1e9,
            "learning_rate": float(lr),
            "val/contain_eos_token": float(np.mean(eos)) if eos else 0.0,
            "time/other": seconds - sum(metrics.get(k, 0.0) for k in PHASES) + metrics.get("time/overlapped", 0.0),
        }
    )
    return metrics


class Reporter:
    """metrics.jsonl, completions.jsonl, the training callback and the progress bar's numbers."""

    def __init__(self, trainer, resumed: bool):
        self.t, self.window, self.last_val = trainer, MetricsWindow(), {}
        self.metrics_log = None
        if trainer.rank == 0:
            keep = trainer.step if resumed else None
            path = trainer.settings.adapter_path
            self.metrics_log = JsonlLog(os.path.join(path, "metrics.jsonl"), truncate_after_step=keep)
            trainer.completions_log = JsonlLog(os.path.join(path, "completions.jsonl"), truncate_after_step=keep)

    def add(self, metrics: dict) -> None:
        pair = {k: v for k, v in metrics.items() if is_pair_metric(k)}
        self.window.add({k: v for k, v in metrics.items() if k not in pair})
        self.window.add(pair, weight=metrics.get("pairs/valid", 0))  # a mean over valid pairs

    def report(self, pbar=None) -> None:
        row = {"step": self.t.step, **self.window.report()}
        if self.metrics_log is not None:
            self.metrics_log.write(row)
        if self.t.callback is not None and self.t.rank == 0:
            self.t.callback.on_train_loss_report({"iteration": self.t.step, "train_loss": row.get("loss"), **row})
        if pbar is not None:
            shown = (
                ("loss", "loss", ".4f"),
                ("rewards/accuracies", "acc", ".2f"),
                ("exploration_bonus", "bonus", ".2e"),
            )
            pbar.set_postfix(
                {n: format(row[k], f) for k, n, f in shown if row.get(k) is not None and np.isfinite(row[k])}
            )

    def validate(self) -> None:
        t = self.t
        t0 = time.perf_counter()
        res = t.validate()
        if res is None:
            return
        row = {"step": t.step, **{f"val_{k}": v for k, v in res.items()}, "val_seconds": time.perf_counter() - t0}
        self.last_val = row
        if self.metrics_log is not None:
            self.metrics_log.write(row)
        if t.callback is not None:
            t.callback.on_val_loss_report({"iteration": t.step, "val_loss": res.get("loss"), **row})
        from tqdm import tqdm  # the progress bar's lock: with the bar, so only when a run starts

        with tqdm.external_write_mode():  # the bar is cleared, the line printed, the bar drawn again
            t.log(validation_line(t.step, res))


def run_loop(trainer, resume_state: Optional[dict] = None) -> dict:
    """Train until `iters` steps, a stop request or a stop reason; save a final checkpoint."""
    from tqdm import tqdm  # the progress bar: only when a run starts

    s, t = trainer.settings, trainer
    resumed = resume_state is not None
    if resumed:
        restore(t, resume_state)
    rep = Reporter(t, resumed)
    pbar = tqdm(
        total=s.iters,
        initial=t.step,
        desc=t.method.mode,
        unit="step",
        disable=not s.progress or t.rank != 0,
        dynamic_ncols=True,
        file=sys.stderr,
    )
    with GracefulStop(t):
        try:
            if not resumed:
                rep.validate()  # the baseline: step 0, before any update
            while t.step < s.iters and not t.stop_reason and not stop_asked(t):
                t.guard.begin_step()
                t.step += 1
                mx.random.seed(step_seed(s.seed, t.step) + 7919 * t.rank)
                mx.reset_peak_memory()
                t0 = time.perf_counter()
                metrics: dict = {}
                try:
                    with peer_lost_in(t.step, t.rank, t.world):  # data parallel: nothing is saved for it
                        loss = t.train_step(metrics)
                except StopTraining as e:
                    t.guard.roll_back_step()  # the step made no update: resume redoes it
                    t.stop_reason = f"stopped by the judge ({e or 'q'})"
                    break
                except JudgeFailure as e:  # no update was made: back to the step's start
                    t.guard.judge_crashed(e)
                    break
                step_row(metrics, time.perf_counter() - t0, t.opt.learning_rate)
                if loss is None:
                    metrics.setdefault("train/no_update_steps", 1)
                rep.add(metrics)
                pbar.update(1)
                if t.step % s.steps_per_report == 0 or t.step == s.iters:
                    rep.report(pbar)
                if t.step % s.steps_per_eval == 0 or t.step == s.iters:
                    rep.validate()
                if t.step % s.save_every == 0 and t.step < s.iters:
                    t.save()
            if rep.window.pending:  # steps since the last report (e.g. interrupted mid-window)
                rep.report()
            stopped_at = t.step
            # still under our handlers: a Ctrl-C during this save exits at once, and the previous
            # checkpoint survives because every file is replaced atomically
            t.guard.before_final_save()
            t.save(final=t.step >= s.iters)
        except RuntimeError as e:  # data parallel: a validation's sum failed (after the step's update)
            with peer_lost_in(t.step, t.rank, t.world):
                raise e
        finally:
            pbar.close()
    return {
        **rep.last_val,
        "step": t.step,  # the step of the saved checkpoint
        "stopped_at": stopped_at,  # the last step run (a judge stop rolls the checkpoint back)
        "updates": t.state.updates,
        "interrupted": bool(t.stop_requests),
        "stop_reason": t.stop_reason,
    }

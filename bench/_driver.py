"""One benchmark run in its own process (started by bench_step.py / bench_scaling.py).

    python bench/_driver.py SPEC.json OUT.json

SPEC: {"impl": "ours" | "upstream", "mode": "xpo" | "online_dpo", "settings": {...}}, where
settings are the run's settings exactly as a user would give them (model, data, judge, batch_size,
max_completion_length, iters, ...). The parent sets ``MLX_XPO_PLUGIN=0`` in the environment of an
"upstream" run, so that mlx-lm-lora's built-in modes are the ones imported. Both sides get the
BLAS our start-up hook would choose (``fast_blas.preload``, called here before ``mlx.core``).

What runs:
* ours:     ``mlx_xpo_plugin.api.train_method(XPO or OnlineDPO, settings, training_callback=cb)`` -- the same
            ``runner.run`` that ``mlx_lm_lora.train --train-mode xpo --config cfg.yaml`` runs.
* upstream: ``mlx_lm_lora.train.run(args, training_callback=cb)`` with ``args`` merged exactly as
            upstream's ``main`` merges them (parser defaults <- given values <- CONFIG_DEFAULTS),
            given values playing the role of command-line flags (so alpha, temperature and
            max_completion_length really apply; upstream ignores them in a YAML file).
            Upstream calls ``mx.set_wired_limit(mx.device_info()["max_recommended_working_set_size"])``,
            which raises KeyError on a CPU-only MLX; the shim below adds that key (value: total RAM),
            and only in this benchmark process.

What is measured (identically for both, with steps_per_report = 1, so that both trainers call the
callback once per optimizer step and no validation runs: the data folder has no valid.jsonl):
* step wall time: time between consecutive ``on_train_loss_report`` calls (one full loop iteration,
  including batch selection, reporting and logging); step 1 has no predecessor and is dropped.
* each trainer's own per-step timer as a cross-check: ours ``step_seconds`` (and the ``time/*``
  phase split), upstream ``1 / iterations_per_second``.
* MLX peak memory per step: ``mx.get_peak_memory()`` read in the callback, then reset; and
  ``mx.get_active_memory()`` there (what stays allocated between steps: weights, adapters,
  optimizer state, anything kept).
* process memory: peak RSS (``VmHWM`` from /proc/self/status, = ru_maxrss) at the end, and RSS right
  after the imports (before any model is loaded) as the baseline of the interpreter and libraries.
* generated tokens per completion (upstream: its BatchGenerator wrapped; ours: the completions
  the rollout returns), to check that
  ``max_completion_length`` limits generation in both; and the tokens of the rows each side scores
  (prompt + completion; upstream re-tokenises the decoded text, ours scores the sampled ids).
* upstream's phases, timed from outside (``bench/rollout``, ``bench/judge``, ``bench/scoring``).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

from _proc import proc_status_kb, run_facts  # noqa: E402  (bench/ is sys.path[0] when run as a script)

from mlx_xpo_plugin.loop.jsonio import dumps as strict_dumps  # noqa: E402


def install_device_info_shim():
    """mx.device_info() on CPU lacks max_recommended_working_set_size; upstream indexes it."""
    import mlx.core as mx

    orig = mx.device_info
    if "max_recommended_working_set_size" in orig():
        return False

    def device_info():
        info = dict(orig())
        info.setdefault("max_recommended_working_set_size", os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        return info

    mx.device_info = device_info
    return True


class TokenCounter:
    """Counts generated tokens per sequence of every BatchGenerator created in a module."""

    def __init__(self):
        self.lengths = []

    def wrap(self, module):
        base = module.BatchGenerator
        counter = self

        class CountingBatchGenerator(base):
            def insert(self, prompts, *a, **k):
                uids = super().insert(prompts, *a, **k)
                self._bench_counts = getattr(self, "_bench_counts", {})
                for u in uids:
                    self._bench_counts[u] = 0
                return uids

            def next_generated(self):
                out = super().next_generated()
                for r in out or ():
                    self._bench_counts[r.uid] = self._bench_counts.get(r.uid, 0) + 1
                return out

            def close(self):
                counter.lengths.extend(getattr(self, "_bench_counts", {}).values())
                self._bench_counts = {}
                return super().close()

        module.BatchGenerator = CountingBatchGenerator


class Callback:
    """A TrainingCallback for both trainers: per-step wall clock and MLX peak memory."""

    def __init__(self):
        import mlx.core as mx

        self.mx = mx
        self.t = []
        self.peaks = []
        self.active = []
        self.rows = []
        self.acc = {}  # per-step extras filled by the wrappers below (phase seconds, scored tokens)

    def add(self, key, value):
        self.acc[key] = self.acc.get(key, 0.0) + value

    def on_train_loss_report(self, info):
        self.t.append(time.perf_counter())
        self.peaks.append(self.mx.get_peak_memory())
        self.active.append(self.mx.get_active_memory())
        self.mx.reset_peak_memory()
        row = {k: v for k, v in info.items() if isinstance(v, (int, float, type(None)))}
        row.update({f"bench/{k}": v for k, v in self.acc.items()})
        self.acc = {}
        self.rows.append(row)

    def on_val_loss_report(self, info):
        pass


def timed(cb, key, fn):
    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            cb.add(key, time.perf_counter() - t)

    return wrapper


def run_upstream(mode, settings, cb, counter):
    import types

    import mlx_lm_lora.train as T
    from mlx_lm_lora.trainer import judge as J
    from mlx_lm_lora.trainer import online_dpo_trainer as O
    from mlx_lm_lora.trainer import xpo_trainer as X

    counter.wrap(O)
    # upstream has no phase timers: time its three phases from outside (each returns evaluated
    # results: strings, ints, and _preference_microbatches ends in mx.eval); the optimizer update
    # is evaluated later by the loop, so it lands in the rest of the step
    for mod in (O, X):
        mod.generate_for_online_dpo = timed(cb, "rollout", mod.generate_for_online_dpo)
        mod._preference_microbatches = timed(cb, "scoring", mod._preference_microbatches)
    orig_pad = O._pad_online_sequences

    def pad(sequences):
        cb.add("scored_rows", len(sequences))
        cb.add("scored_tokens", sum(int(getattr(x, "size", None) or len(x)) for x in sequences))
        return orig_pad(sequences)

    O._pad_online_sequences = pad
    verdicts = {"0": 0, "1": 0, "invalid": 0}
    orig_judge = J.LLMPairwiseJudge.judge

    def judge(self, prompts, completions, shuffle_order=True):
        # count the judge's raw answers: -1 (not "0"/"1") is later used as "the second one wins"
        import mlx_lm_lora.trainer.judge as jm

        orig_generate = jm.generate

        def gen(*a, **k):
            r = orig_generate(*a, **k)
            verdicts[r if r in ("0", "1") else "invalid"] += 1
            return r

        jm.generate = gen
        try:
            return orig_judge(self, prompts, completions, shuffle_order)
        finally:
            jm.generate = orig_generate

    J.LLMPairwiseJudge.judge = timed(cb, "judge", judge)
    args = vars(T.build_parser().parse_args([]))
    args.update(settings, train_mode=mode)
    for k, v in T.CONFIG_DEFAULTS.items():
        if args.get(k) is None:
            args[k] = v
    T.run(types.SimpleNamespace(**args), training_callback=cb)
    return {"upstream_judge_answers": verdicts}


def run_ours(mode, settings, cb, counter):
    from mlx_xpo_plugin import online_dpo_trainer
    from mlx_xpo_plugin.api import train_method
    from mlx_xpo_plugin.compute import rollout
    from mlx_xpo_plugin.loop import pair_loss
    from mlx_xpo_plugin.online_dpo_trainer import OnlineDPO
    from mlx_xpo_plugin.xpo_trainer import XPO

    orig_sample = rollout.sample_completions

    def sample_completions(*a, **k):  # every rollout, compiled decoder or BatchGenerator
        rows = orig_sample(*a, **k)
        counter.lengths.extend(len(c.tokens) for row in rows for c in row)
        return rows

    rollout.sample_completions = online_dpo_trainer.sample_completions = sample_completions
    orig_pack = pair_loss.pack

    def pack(prompts, completions, *a, **k):
        cb.add("scored_rows", len(prompts))
        cb.add("scored_tokens", sum(len(p) + len(c) for p, c in zip(prompts, completions)))
        return orig_pack(prompts, completions, *a, **k)

    pair_loss.pack = pack
    method = {"xpo": XPO, "online_dpo": OnlineDPO}[mode]
    rc = train_method(method, dict(settings), training_callback=cb, progress=True)
    if rc != 0:
        raise SystemExit(f"our trainer exited with status {rc}")
    return {}


def main():
    spec = json.load(open(sys.argv[1]))
    out_path = sys.argv[2]
    impl, mode, settings = spec["impl"], spec["mode"], spec["settings"]
    t_start = time.perf_counter()
    from mlx_xpo_plugin.cpu import fast_blas

    fast_blas.preload()  # the same BLAS on both sides: upstream runs without our start-up hook
    import mlx.core as mx  # noqa: F401
    import mlx_lm  # noqa: F401
    import mlx_lm_lora.train  # noqa: F401  (both sides load models through mlx_lm_lora.utils)

    import mlx_xpo_plugin.commands.runner  # noqa: F401

    shim = install_device_info_shim()
    rss_after_imports_kb = proc_status_kb("VmRSS")
    t_imported = time.perf_counter()
    cb, counter = Callback(), TokenCounter()
    extra = (run_upstream if impl == "upstream" else run_ours)(mode, settings, cb, counter)
    t_end = time.perf_counter()
    steps = [dict(r) for r in cb.rows if r.get("iteration") is not None]
    wall = [None] + [b - a for a, b in zip(cb.t, cb.t[1:])]
    for i, r in enumerate(steps):
        r["wall_seconds"] = wall[i] if i < len(wall) else None
        r["mx_peak_bytes"] = cb.peaks[i]
        r["mx_active_bytes"] = cb.active[i]
        if impl == "upstream":
            ips = r.get("iterations_per_second")
            r["own_step_seconds"] = 1.0 / ips if ips else None
        else:
            r["own_step_seconds"] = r.get("step_seconds")
    result = {
        "impl": impl,
        "mode": mode,
        "settings": settings,
        "device_info_shim": shim,
        "plugin_env": os.environ.get("MLX_XPO_PLUGIN"),
        "blas_libraries_mapped": blas_libraries_mapped(),
        "blas": fast_blas.banner_line(),
        "steps": steps,
        **run_facts(t_start, t_imported, t_end, rss_after_imports_kb, cb.t, counter.lengths),
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **extra,
    }
    with open(out_path, "w") as f:
        f.write(strict_dumps(result, indent=1))  # strict JSON: NaN -> null


def blas_libraries_mapped() -> list:
    """The BLAS libraries this process has mapped (evidence of which one MLX runs on)."""
    try:
        names = {line.split()[-1] for line in open("/proc/self/maps") if len(line.split()) >= 6}
    except OSError:
        return []
    return sorted(os.path.basename(n) for n in names if "blas" in os.path.basename(n).lower() or "shim" in n)


if __name__ == "__main__":
    main()

"""Pairs per second of this plugin's MLX model judge (logits mode) against upstream
mlx-lm-lora's ``LLMPairwiseJudge``, on the same tiny random model and the same pairs.

    python bench/bench_judge.py                      # tiny preset, 32 pairs, 5 repeats
    python bench/bench_judge.py --presets tiny,small

Each repeat times every judge once on all pairs; the order of the judges alternates between
repeats (A B, B A, ...), after one untimed warm-up call each. Prints a Markdown table (median,
min and max pairs/s, and the ratio of medians against upstream) and writes JSON to
``bench/results/judge.json``. Nothing is downloaded: the models are built offline by
``mlx_xpo_plugin.commands.tiny``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import platform
import random
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mlx_xpo_plugin.commands.tiny import build_tiny_model, embedded_prompts  # noqa: E402
from mlx_xpo_plugin.judges.common import pair_messages  # noqa: E402
from mlx_xpo_plugin.judges.llm import LLMJudge  # noqa: E402
from mlx_xpo_plugin.loop.jsonio import dumps as strict_dumps  # noqa: E402

WORDS = (
    "yes sure what a lovely day i like it a lot the answer is simple it is good and kind "
    "sea fox winter bridge coffee moon park rain boat path bread library storm kite"
).split()


def make_pairs(n: int, seed: int = 0):
    """n prompts with two completions each of 8-40 words (what a small policy samples)."""
    rng = random.Random(seed)
    prompts = [embedded_prompts()[(5 * i) % 168] for i in range(n)]

    def completion():
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40))).capitalize() + "."

    return prompts, [(completion(), completion()) for _ in range(n)]


def _cpu_shim():
    """Upstream's ``generate`` may read ``mx.device_info()["max_recommended_working_set_size"]``,
    which the CPU backend lacks; give it a value (bench only)."""
    import mlx.core as mx

    info = mx.device_info()
    if "max_recommended_working_set_size" not in info:
        orig = mx.device_info

        def device_info():
            d = dict(orig())
            d.setdefault("max_recommended_working_set_size", 1 << 40)
            return d

        mx.device_info = device_info
        return True
    return False


class Upstream:
    name = "upstream LLMPairwiseJudge (generate, 16 tokens)"

    def __init__(self, model, tok):
        from mlx_lm_lora.trainer.judge import LLMPairwiseJudge

        self.judge_ = LLMPairwiseJudge(model, tok)
        self.last = None

    def __call__(self, prompts, pairs):
        np.random.seed(0)
        with contextlib.redirect_stdout(io.StringIO()):  # it prints one line per invalid answer
            self.last = self.judge_.judge(prompts, [list(p) for p in pairs])
        return self.last

    def summary(self):
        r = self.last
        return {
            "labels_0_1": sum(x in (0, 1) for x in r),
            "minus_1": sum(x == -1 for x in r),
            "two_from_flipped_invalid": sum(x == 2 for x in r),
        }


class Ours:
    def __init__(self, model, tok, label, **cfg):
        self.judge_ = LLMJudge(model, tok, seed=0, **cfg)
        self.name, self.last = label, None

    def __call__(self, prompts, pairs):
        self.last = self.judge_.judge(prompts, pairs)
        return self.last

    def summary(self):
        vs = self.last
        return {
            "labels_0_1": sum(v.winner is not None for v in vs),
            "ties": sum(v.tie for v in vs),
            "invalid": sum(v.invalid for v in vs),
        }


def prompt_tokens(tok, prompts, pairs):
    from mlx_lm_lora.trainer.judge import DEFAULT_PAIRWISE_SYSTEM_PROMPT as UP

    ours, up = [], []
    for p, (a, b) in zip(prompts, pairs):
        ours.append(
            len(
                tok.encode(
                    tok.apply_chat_template(pair_messages(None, p, a, b), tokenize=False, add_generation_prompt=True)
                )
            )
        )
        up.append(
            len(
                tok.encode(
                    tok.apply_chat_template(
                        [{"role": "user", "content": UP.format(prompt=p, response0=a, response1=b)}],
                        tokenize=False,
                        add_generation_prompt=True,
                    )
                )
            )
        )
    return float(np.mean(ours)), float(np.mean(up))


def bench_preset(preset: str, n_pairs: int, repeats: int, extra: bool) -> dict:
    from mlx_lm import load

    path = build_tiny_model(REPO / ".cache" / "bench-models" / preset, preset=preset, seed=0)
    model, tok = load(str(path))
    prompts, pairs = make_pairs(n_pairs)
    judges = [Ours(model, tok, "ours: logits (default)"), Upstream(model, tok)]
    if extra:
        judges += [
            Ours(model, tok, "ours: logits, both_orders", both_orders=True),
            Ours(model, tok, "ours: generate, 8 tokens", mode="generate"),
        ]
    shim = False
    for j in judges:  # warm-up
        try:
            j(prompts, pairs)
        except KeyError as e:
            if "max_recommended_working_set_size" not in str(e):
                raise
            shim = _cpu_shim()
            j(prompts, pairs)
    times = {j.name: [] for j in judges}
    for r in range(repeats):
        for j in judges if r % 2 == 0 else judges[::-1]:
            t0 = time.perf_counter()
            j(prompts, pairs)
            times[j.name].append(time.perf_counter() - t0)
    ours_tok, up_tok = prompt_tokens(tok, prompts, pairs)
    up_med = statistics.median(n_pairs / t for t in times[Upstream.name])
    rows = []
    for j in judges:
        rates = [n_pairs / t for t in times[j.name]]
        med = statistics.median(rates)
        rows.append(
            {
                "judge": j.name,
                "pairs_per_s_median": med,
                "pairs_per_s_min": min(rates),
                "pairs_per_s_max": max(rates),
                "seconds": times[j.name],
                "ratio_vs_upstream": med / up_med,
                "verdicts": j.summary(),
            }
        )
    return {
        "preset": preset,
        "model_path": str(path),
        "pairs": n_pairs,
        "repeats": repeats,
        "mean_prompt_tokens": {"ours": ours_tok, "upstream": up_tok},
        "cpu_shim_used": shim,
        "rows": rows,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="tiny", help="comma list of tiny,small")
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--small-pairs", type=int, default=8, help="pairs for the small preset")
    ap.add_argument("--small-repeats", type=int, default=2)
    ap.add_argument("--no-extra", action="store_true", help="only ours (logits) vs upstream")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "judge.json"))
    args = ap.parse_args(argv)

    import mlx.core as mx

    results = []
    for preset in [p.strip() for p in args.presets.split(",") if p.strip()]:
        small = preset != "tiny"
        results.append(
            bench_preset(
                preset,
                args.small_pairs if small else args.pairs,
                args.small_repeats if small else args.repeats,
                extra=not args.no_extra and not small,
            )
        )
    report = {
        "benchmark": "judge pairs/second: ours (logits mode) vs upstream LLMPairwiseJudge",
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "python": platform.python_version(),
            "mlx_device": str(mx.default_device()),
        },
        "versions": {k: version(k) for k in ("mlx", "mlx-lm", "mlx-lm-lora")},
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(strict_dumps(report, indent=2) + "\n")

    print("| preset | judge | pairs/s (median) | min | max | vs upstream | labels / ties / invalid |")
    print("|---|---|---:|---:|---:|---:|---|")
    for res in results:
        for r in res["rows"]:
            v = r["verdicts"]
            counts = (
                f"{v['labels_0_1']} / {v.get('ties', 0)} / {v['invalid']}"
                if "invalid" in v
                else f"{v['labels_0_1']} labels, {v['minus_1']} x -1, {v['two_from_flipped_invalid']} x 2"
            )
            print(
                f"| {res['preset']} | {r['judge']} | {r['pairs_per_s_median']:.1f} | "
                f"{r['pairs_per_s_min']:.1f} | {r['pairs_per_s_max']:.1f} | "
                f"{r['ratio_vs_upstream']:.1f}x | {counts} |"
            )
        t = res["mean_prompt_tokens"]
        print(
            f"\n{res['preset']}: {res['pairs']} pairs x {res['repeats']} repeats; mean prompt "
            f"tokens ours {t['ours']:.0f}, upstream {t['upstream']:.0f}\n"
        )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

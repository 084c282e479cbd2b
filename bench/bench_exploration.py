"""Does XPO's bonus explore? Evidence per form (kl, kl_upstream, paper) and alpha, over seeds.

Three parts, on the tiny random model with LoRA (Adam 3e-3, batch 4, completions of at most 16
tokens sampled at the default temperature 0.8):

(0) estimator: for sampled pairs of a perturbed policy, the variance of the 'kl' form's gradient
    estimate with per-token (reward-to-go) and per-sequence credit, same pairs, same baseline.
(a) drift and diversity: after training against a rule judge (more letter 'e' wins), the exact
    per-token KL(pi_theta || pi_ref) along sampled completions (the vocabulary summed at every
    position), distinct-2 and the unique-completion rate, for alpha in {0, 1e-4, ..., 1}.
    Each seed's value is divided by the same seed's alpha = 0 run (same data order and draws
    until the updates differ): the ratio is the effect of alpha, its spread over seeds the noise.
(b) the setting XPO was made for: the judge prefers completions with more of one letter that the
    reference rarely writes (chosen as the letter closest to a 5% rate in reference samples),
    so a random pair rarely holds a winner. Measured: judged pairs until the policy's win-rate
    against the reference (ties count half) first reaches 0.6, checked every `every` steps.

    python bench/bench_exploration.py [--seeds 5] [--steps 60] [--quick]

Writes bench/results/exploration.json, exploration.md and exploration.png.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time

import _toy as toy
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from _common import RESULTS, cache_dir, model_path

from mlx_xpo_plugin.commands.data import load_prompts
from mlx_xpo_plugin.commands.tiny import write_prompt_dataset
from mlx_xpo_plugin.compute.reference import Reference
from mlx_xpo_plugin.compute.rollout import SamplingConfig, sample_completions
from mlx_xpo_plugin.compute.scoring import completion_logps, first_completion_position, pack
from mlx_xpo_plugin.loop.prompts import PromptSet
from mlx_xpo_plugin.xpo_trainer import xpo_kl_bonus

ALPHAS = [0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1.0]
FORMS = ["kl", "kl_upstream", "paper"]
TEMPERATURE, MAX_TOKENS, BATCH = 0.8, 16, 4
#: the trainer's settings besides steps, seed and the XPO term: no reports or validations of its own
LOOP = {"batch_size": BATCH, "max_completion_length": MAX_TOKENS, "temperature": TEMPERATURE}
LOOP.update(steps_per_report=10**9, steps_per_eval=10**9)


load = toy.load


def trainer(model, tok, train, mode, form, alpha, seed, steps, letter, ad):
    extra = {} if mode == "online_dpo" else {"alpha": alpha, "xpo_bonus": form}
    return toy.trainer(model, tok, train, mode, letter, ad, iters=steps, seed=seed, **LOOP, **extra)


# ------------------------------------------------------------------ measurements


def exact_token_kl(model, prompts, completions) -> float:
    """Mean over completion tokens of KL(pi_theta(.|prefix) || pi_ref(.|prefix)), vocabulary summed."""
    inputs, targets, mask = pack(prompts, [c.tokens for c in completions])
    start = first_completion_position(mask)
    lp = nn.log_softmax(model(inputs)[:, start:].astype(mx.float32), axis=-1)
    with Reference(model).use() as ref:
        lr = nn.log_softmax(ref(inputs)[:, start:].astype(mx.float32), axis=-1)
    kl = (mx.exp(lp) * (lp - lr)).sum(axis=-1)
    m = mask[:, start:]
    return float(((kl * m).sum() / mx.maximum(m.sum(), 1)).item())


def diversity(groups) -> tuple[float, float]:
    """(distinct-2 over all completions' token bigrams, mean unique-completion rate per prompt)."""
    bigrams = [tuple(c.tokens[i : i + 2]) for g in groups for c in g for i in range(len(c.tokens) - 1)]
    d2 = len(set(bigrams)) / len(bigrams) if bigrams else 0.0
    uniq = statistics.mean(len({tuple(c.tokens) for c in g}) / len(g) for g in groups)
    return d2, uniq


def drift_and_diversity(model, tok, test, seed, n=4):
    model.eval()
    mx.random.seed(20_000 + seed)
    groups = sample_completions(model, tok, test.ids, n, SamplingConfig(MAX_TOKENS, TEMPERATURE))
    flat_p = [p for p, g in zip(test.ids, groups) for _ in g]
    flat_c = [c for g in groups for c in g]
    kl = exact_token_kl(model, flat_p, flat_c)
    model.train()
    return (kl, *diversity(groups))


def win_rate(t, test, seed):
    mx.random.seed(10_000 + seed)
    r = t.evaluate(test)
    return (r["wins"] + 0.5 * r["ties"]) / max(1, r["pairs"])


# ------------------------------------------------------------------ parts


def part_estimator(path, train, n_pairs):
    """Per-pair gradient variance of the kl bonus: token vs sequence credit, on the same pairs."""
    model, tok = load(path, 0)
    rng = np.random.default_rng(0)  # a policy away from the reference
    from mlx.utils import tree_flatten, tree_unflatten

    model.update(
        tree_unflatten(
            [
                (k, mx.array(rng.normal(0, 0.02, v.shape).astype(np.float32)))
                for k, v in tree_flatten(model.trainable_parameters())
            ]
        )
    )
    prompts = train.ids[:n_pairs]
    mx.random.seed(1)
    pairs = sample_completions(model, tok, prompts, 2, SamplingConfig(MAX_TOKENS, TEMPERATURE))
    out = {}
    for credit in ("token", "sequence"):
        grads = []
        for p, (a, b) in zip(prompts, pairs):
            inputs, targets, mask = pack([p, p], [a.tokens, b.tokens])
            with Reference(model).use() as ref:
                ref_tok = mx.stop_gradient(completion_logps(ref, inputs, targets, mask).tokens)

            def bonus(m):
                sc = completion_logps(m, inputs, targets, mask, temperature=TEMPERATURE)
                return xpo_kl_bonus(sc.tokens, ref_tok, sc.mask, 1.0, sc.tempered, credit == "token").sum()

            _, g = nn.value_and_grad(model, bonus)(model)
            grads.append(np.concatenate([np.array(v).ravel() for _, v in tree_flatten(g)]))
        G = np.array(grads)
        out[credit] = {
            "variance": float(((G - G.mean(0)) ** 2).sum(1).mean()),
            "mean_sq_norm": float((G.mean(0) ** 2).sum()),
        }
    out["ratio_token_over_sequence"] = out["token"]["variance"] / out["sequence"]["variance"]
    return out


def rare_letter(path, tok_prompts, seed=0, n=8) -> tuple[str, float]:
    """The letter whose rate of appearing in a reference completion is closest to 5% (> 0)."""
    model, tok = load(path, seed)
    mx.random.seed(seed)
    groups = sample_completions(model, tok, tok_prompts.ids, n, SamplingConfig(MAX_TOKENS, TEMPERATURE))
    texts = [c.text for g in groups for c in g]
    rates = {ch: sum(ch in t for t in texts) / len(texts) for ch in "abcdefghijklmnopqrstuvwxyz"}
    letter = min((ch for ch in rates if rates[ch] > 0), key=lambda ch: abs(math.log(rates[ch] / 0.05)))
    return letter, rates[letter]


def part_drift(path, train, test, seeds, steps):
    rows = []
    configs = [("online_dpo", "-", 0.0)] + [
        ("xpo", f, a) for f in FORMS for a in ALPHAS if not (f != "paper" and a == 0.0)
    ]
    for mode, form, alpha in configs:
        for seed in range(seeds):
            model, tok = load(path, seed)
            with tempfile.TemporaryDirectory() as ad:
                trainer(model, tok, train, mode, form, alpha, seed, steps, "e", ad).train()
            kl, d2, uniq = drift_and_diversity(model, tok, test, seed)
            rows.append(
                {"mode": mode, "form": form, "alpha": alpha, "seed": seed, "kl": kl, "distinct2": d2, "unique": uniq}
            )
            print(
                f"(a) {mode:>10} {form:>11} alpha={alpha:<6g} seed {seed}: KL/token {kl:.4f} "
                f"distinct-2 {d2:.3f} unique {uniq:.2f}",
                flush=True,
            )
    return rows


def part_rare(path, train, test, seeds, steps, every, alphas, letter):
    rows = []
    configs = [("online_dpo", "-", 0.0)] + [("xpo", f, a) for f in FORMS for a in alphas]
    for mode, form, alpha in configs:
        for seed in range(seeds):
            model, tok = load(path, seed)
            with tempfile.TemporaryDirectory() as ad:
                t = trainer(model, tok, train, mode, form, alpha, seed, steps, letter, ad)
                curve = []

                def validate():
                    curve.append((t.step * BATCH, win_rate(t, test, seed)))

                t.validate = validate
                t.settings.steps_per_eval = every
                t.train()
            hit = next((p for p, w in curve if w >= 0.6), None)
            rows.append({"mode": mode, "form": form, "alpha": alpha, "seed": seed, "curve": curve, "pairs_to_0.6": hit})
            print(
                f"(b) {mode:>10} {form:>11} alpha={alpha:<6g} seed {seed}: pairs to 0.6: {hit}; "
                + " ".join(f"{w:.2f}" for _, w in curve),
                flush=True,
            )
    return rows


# ------------------------------------------------------------------ report


def ci95(xs):
    """(mean, half-width of the 95% t-interval) of a small sample."""
    t = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78, 6: 2.57, 7: 2.45, 8: 2.36, 9: 2.31, 10: 2.26}
    m = statistics.mean(xs)
    return m, (t.get(len(xs), 2.0) * statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan"))


def drift_table(rows):
    base = {r["seed"]: r for r in rows if r["mode"] == "online_dpo"}
    lines = [
        "| method | alpha | KL/token (mean ± 95% CI) | KL ratio to alpha 0 (geo. mean [min-max]) "
        "| distinct-2 | unique completions |",
        "|---|---|---|---|---|---|",
    ]
    keys = sorted({(r["mode"], r["form"], r["alpha"]) for r in rows}, key=lambda k: (k[0] != "online_dpo", k[1], k[2]))
    for mode, form, alpha in keys:
        rs = [r for r in rows if (r["mode"], r["form"], r["alpha"]) == (mode, form, alpha)]
        ratios = [r["kl"] / base[r["seed"]]["kl"] for r in rs if r["seed"] in base and base[r["seed"]]["kl"] > 0]
        m, h = ci95([r["kl"] for r in rs])
        d2, dh = ci95([r["distinct2"] for r in rs])
        u, uh = ci95([r["unique"] for r in rs])
        geo = math.exp(statistics.mean(math.log(x) for x in ratios)) if ratios else float("nan")
        label = "online DPO" if mode == "online_dpo" else f"xpo {form}"
        lines.append(
            f"| {label} | {alpha:g} | {m:.4f} ± {h:.4f} | {geo:.2f} [{min(ratios):.2f}-{max(ratios):.2f}] "
            f"| {d2:.3f} ± {dh:.3f} | {u:.2f} ± {uh:.2f} |"
        )
    return "\n".join(lines)


def rare_table(rows, steps):
    lines = [
        "| method | alpha | judged pairs to win-rate 0.6 (per seed) | reached | final win-rate (mean ± 95% CI) |",
        "|---|---|---|---|---|",
    ]
    keys = sorted({(r["mode"], r["form"], r["alpha"]) for r in rows}, key=lambda k: (k[0] != "online_dpo", k[1], k[2]))
    for mode, form, alpha in keys:
        rs = [r for r in rows if (r["mode"], r["form"], r["alpha"]) == (mode, form, alpha)]
        hits = [r["pairs_to_0.6"] for r in rs]
        cells = ", ".join(str(h) if h is not None else f">{steps * BATCH}" for h in hits)
        fm, fh = ci95([r["curve"][-1][1] for r in rs])
        label = "online DPO" if mode == "online_dpo" else f"xpo {form}"
        lines.append(
            f"| {label} | {alpha:g} | {cells} | {sum(h is not None for h in hits)}/{len(hits)} | {fm:.2f} ± {fh:.2f} |"
        )
    return "\n".join(lines)


def plot(drift, rare):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    base = {r["seed"]: r["kl"] for r in drift if r["mode"] == "online_dpo"}
    for form in FORMS:
        xs, ms, lo, hi = [], [], [], []
        for a in ALPHAS[1:]:
            ratios = [r["kl"] / base[r["seed"]] for r in drift if r["form"] == form and r["alpha"] == a]
            if ratios:
                xs.append(a)
                ms.append(statistics.mean(ratios))
                lo.append(min(ratios))
                hi.append(max(ratios))
        ax1.errorbar(
            xs, ms, yerr=[np.subtract(ms, lo), np.subtract(hi, ms)], marker="o", capsize=3, label=f"xpo {form}"
        )
    ax1.axhline(1.0, color="grey", ls="--", lw=1)
    ax1.set_xscale("log")
    ax1.set_xlabel("alpha")
    ax1.set_ylabel("KL/token ratio to online DPO (mean, seed range)")
    ax1.set_title("(a) drift from the reference")
    ax1.legend()
    keys = sorted({(r["mode"], r["form"], r["alpha"]) for r in rare}, key=lambda k: (k[0] != "online_dpo", k[1], k[2]))
    for mode, form, alpha in keys:
        rs = [r for r in rare if (r["mode"], r["form"], r["alpha"]) == (mode, form, alpha)]
        pts = [p for p, _ in rs[0]["curve"]]
        ws = [statistics.mean(r["curve"][i][1] for r in rs) for i in range(len(pts))]
        ax2.plot(pts, ws, marker=".", label="online DPO" if mode == "online_dpo" else f"xpo {form} {alpha:g}")
    ax2.axhline(0.6, color="grey", ls="--", lw=1)
    ax2.set_xlabel("judged pairs")
    ax2.set_ylabel("win-rate vs reference (mean over seeds)")
    ax2.set_title("(b) a rarely written letter wins")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "exploration.png", dpi=90)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps of part (a)")
    ap.add_argument("--rare-steps", type=int, default=80, help="optimizer steps of part (b)")
    ap.add_argument("--every", type=int, default=10, help="part (b): steps between win-rate checks")
    ap.add_argument("--rare-alphas", default="1e-4,0.1,1", help="part (b): alphas of each form")
    ap.add_argument("--estimator-pairs", type=int, default=24)
    ap.add_argument("--parts", default="0ab")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--quick", action="store_true", help="2 seeds, 6 steps: a smoke run")
    ns = ap.parse_args(argv)
    if ns.quick:
        ns.seeds, ns.steps, ns.rare_steps, ns.every, ns.estimator_pairs = 2, 6, 6, 3, 4
    path = model_path(ns.preset)
    data = str(write_prompt_dataset(cache_dir() / "data-learning"))
    _, tok = load(path, 0)
    train = load_prompts(data, "train", tok, 200)
    test = load_prompts(data, "test", tok, 200)
    test = PromptSet(test.ids * 2, test.texts * 2)
    t0 = time.time()
    out = {"settings": {**vars(ns), "temperature": TEMPERATURE, "max_tokens": MAX_TOKENS, "batch": BATCH}}
    if "0" in ns.parts:
        out["estimator"] = part_estimator(path, train, ns.estimator_pairs)
        print("(0)", json.dumps(out["estimator"]), flush=True)
    if "a" in ns.parts:
        out["drift"] = part_drift(path, train, test, ns.seeds, ns.steps)
    if "b" in ns.parts:
        letter, rate = rare_letter(path, test)
        out["rare"] = {
            "letter": letter,
            "reference_rate": rate,
            "rows": part_rare(
                path,
                train,
                test,
                ns.seeds,
                ns.rare_steps,
                ns.every,
                [float(a) for a in ns.rare_alphas.split(",")],
                letter,
            ),
        }
    out["seconds"] = time.time() - t0
    RESULTS.mkdir(exist_ok=True)
    name = "exploration_quick" if ns.quick else "exploration"
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=1))
    md = [
        f"XPO exploration ({ns.preset} model + LoRA, batch {BATCH}, completions <= {MAX_TOKENS} tokens at "
        f"temperature {TEMPERATURE}, Adam 3e-3, {ns.seeds} seeds; {out['seconds']:.0f} s)\n"
    ]
    if "estimator" in out:
        e = out["estimator"]
        md.append(
            f"(0) kl-form gradient estimate over {ns.estimator_pairs} sampled pairs: variance with per-token "
            f"credit / per-sequence credit = {e['ratio_token_over_sequence']:.2f} "
            f"(token {e['token']['variance']:.3g}, sequence {e['sequence']['variance']:.3g}).\n"
        )
    if "drift" in out:
        md.append(
            f"(a) after {ns.steps} steps against the 'more e' judge; exact KL(pi_theta || pi_ref) per token "
            f"along 4 samples of each of {len(test)} held-out prompts:\n\n{drift_table(out['drift'])}\n"
        )
    if "rare" in out:
        r = out["rare"]
        md.append(
            f"(b) judge: more '{r['letter']}' wins (in {100 * r['reference_rate']:.1f}% of reference "
            f"completions); {ns.rare_steps} steps, win-rate (ties half) on {len(test)} held-out pairs "
            f"every {ns.every} steps:\n\n{rare_table(r['rows'], ns.rare_steps)}\n"
        )
    (RESULTS / f"{name}.md").write_text("\n".join(md))
    print("\n".join(md))
    if not ns.quick and "drift" in out and "rare" in out:
        plot(out["drift"], out["rare"]["rows"])
    print(f"done in {out['seconds']:.0f} s")


if __name__ == "__main__":
    main()

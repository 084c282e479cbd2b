"""Distance to the machine's limits at a real model size, per phase and per precision.

    python bench/bench_limits.py                   # q05 (Qwen2.5-0.5B's shape), bf16 and 4-bit
    python bench/bench_limits.py --preset q15 --rounds 1

One process; every rate is measured in it, so the numbers compare with each other:

* sgemm: float32 [256 x hidden] @ [hidden x intermediate] (the MLP's up projection), best of N;
  also bfloat16 and a 4-bit ``quantized_matmul`` with float32 activations and with bfloat16 ones
  (as a bfloat16 checkpoint's quantized layers run it; 32 rows), for the ratio.
* read bandwidth: ``sum`` over a 512 MiB float32 array, best of N (bytes / second): MLX's (one
  thread), numpy's in one thread, and numpy's in one thread per core. The floor uses the largest;
  a second floor uses one thread's, what a product on one BLAS thread (the pip OpenBLAS's count on
  2 cores) could stream at best.
* decode: greedy decoding of ``--rows`` rows (4: a step's rollout, 2 prompts x 2 completions) with
  ``decode.generate`` (the trainer's sampler); time per token =
  (t(40) - t(8)) / 32, each t the best of 3, which cancels the prompt pass and the tracing of the
  compiled step (once per call). The same step's matrix products alone (each
  weight matrix once, as its layer computes it, with ``rows`` rows) are timed too: what the BLAS takes.
  Its floor = the bytes of weights one
  decode step reads (every parameter: the projections, and the tied embedding as the output
  layer) / the read bandwidth.
* scoring: ``completion_logps`` of 4 rows (prompt + completion), forward only (the reference
  pass), and forward + backward with LoRA (the policy pass). FLOPs: 2 x tokens x (parameters
  outside the embedding) + 2 x scored positions x vocab x hidden (the output layer) + attention
  (4 x layers x rows x positions^2 x hidden); the backward (activations only: the base is frozen)
  counts the same again. GFLOP/s = FLOPs / seconds, compared with the sgemm rate.

Variants: the checkpoint as stored (``compute_dtype: native``) and converted by ``compute_dtype:
auto`` (float32 on the CPU backend). The native variants' scoring is slow (bfloat16 and 4-bit
products run outside BLAS), so they get ``--native-rows`` rows (default 1) and no backward pass.
Rounds alternate the variants; each number is the median over rounds [min-max].

Output: bench/results/limits.json and limits.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as B  # noqa: E402

from mlx_xpo_plugin.commands.calibration import best_of  # noqa: E402


def build(preset: str, bits):
    from mlx_xpo_plugin.commands.tiny import build_tiny_model

    name = f"model-{preset}-bf16" + (f"-q{bits}" if bits else "")
    return str(build_tiny_model(B.cache_dir() / name, preset=preset, dtype="bfloat16", bits=bits))


def load_as_run(preset: str):
    """The preset's bf16 checkpoint loaded as a run loads it: the fast BLAS chosen first (before
    mlx.core loads), then ``compute_dtype: auto`` (float32 on the CPU)."""
    from mlx_xpo_plugin.cpu import fast_blas

    fast_blas.request()
    fast_blas.preload()
    from mlx_lm import load

    from mlx_xpo_plugin.compute import precision

    model, _ = load(build(preset, None))
    precision.apply(model, "auto", "model", log=lambda s: None)
    return model


def load_with_lora(preset: str):
    """:func:`load_as_run`'s model frozen, with LoRA rank 8 on every projection (evaluated)."""
    model = load_as_run(preset)
    import mlx.core as mx
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model.freeze()
    linear_to_lora_layers(model, model.args.num_hidden_layers, {"rank": 8, "dropout": 0.0, "scale": 10.0})
    mx.eval(model.parameters())
    return model


def sgemm_gflops(hidden: int, inter: int, n: int) -> float:
    """float32 GFLOP/s of a 256-row product at an MLP's shape (256 x hidden @ hidden x inter), best of n."""
    import mlx.core as mx

    a, b = mx.random.normal((256, hidden)), mx.random.normal((hidden, inter))
    mx.eval(a, b)
    return 2 * 256 * hidden * inter / best_of(lambda: mx.eval(a @ b), n) / 1e9


def machine_rates(hidden: int, inter: int, n: int) -> dict:
    import mlx.core as mx

    a, b = mx.random.normal((256, hidden)), mx.random.normal((hidden, inter))
    ab, bb = a.astype(mx.bfloat16), b.astype(mx.bfloat16)
    q = mx.quantize(b.T, 64, 4)
    qb = mx.quantize(bb.T, 64, 4)  # a bfloat16 checkpoint's 4-bit layer: bfloat16 scales and biases
    big = mx.random.normal((128 * 2**20,))
    mx.eval(a, b, ab, bb, *q, *qb, big)
    flop = 2 * 256 * hidden * inter
    return {
        "sgemm_gflops": sgemm_gflops(hidden, inter, n),
        "bf16_gemm_gflops": flop / best_of(lambda: mx.eval(ab @ bb), max(1, n // 3)) / 1e9,
        "q4_f32act_gflops": flop
        / best_of(lambda: mx.eval(mx.quantized_matmul(a, *q, transpose=True, group_size=64, bits=4)), max(1, n // 3))
        / 1e9,
        # 32 rows: at its rate (well under 1 GFLOP/s here) 256 rows would take seconds per product
        "q4_bf16act_gflops": flop
        / 8
        / best_of(lambda: mx.eval(mx.quantized_matmul(ab[:32], *qb, transpose=True, group_size=64, bits=4)), 1)
        / 1e9,
        "read_gbs": big.nbytes / best_of(lambda: mx.eval(big.sum()), n) / 1e9,
        "read_gbs_one_core": read_bandwidth(n, threads=1),
        "read_gbs_all_cores": read_bandwidth(n),
    }


def read_bandwidth(n: int, mib: int = 512, threads: int | None = None) -> float:
    """Bytes / second read by one numpy ``sum`` per thread (default: one per usable core) over its
    share of a float32 array (numpy releases the GIL in reductions): what a product on that many
    threads could stream at best."""
    import threading

    import numpy as np

    from mlx_xpo_plugin.cpu.fast_blas import usable_cores

    k = threads or usable_cores()
    parts = np.array_split(np.ones(mib * 2**18, dtype=np.float32), k)

    def once():
        ts = [threading.Thread(target=p.sum) for p in parts]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    return mib * 2**20 / best_of(once, n) / 1e9


def decode_products(model, rows: int):
    """A function computing, once each, the matrix products of one decode step of ``rows`` rows
    (every projection, and the output layer), as the model's layers compute them and nothing else:
    the part of a decode step that the BLAS (or MLX's own kernels) does."""
    import mlx.core as mx
    import mlx.nn as nn

    layers = [m for _, m in model.named_modules() if isinstance(m, (nn.Linear, nn.QuantizedLinear))]
    dtype = model.model.embed_tokens(mx.array([[1]])).dtype
    xs = []
    for m in layers:
        k = m.weight.shape[1] * (32 // m.bits if isinstance(m, nn.QuantizedLinear) else 1)
        xs.append(mx.random.normal((rows, k)).astype(dtype))
    head = mx.random.normal((rows, model.args.hidden_size)).astype(dtype)
    mx.eval(xs, head)

    def run():
        for m, x in zip(layers, xs):
            mx.eval(m(x))  # one at a time, as a decode step meets them
        mx.eval(model.model.embed_tokens.as_linear(head))

    return run


def model_flops(args, tokens: int, positions: int, rows: int, seq: int, n_params_body: int) -> float:
    head = 2 * positions * args.vocab_size * args.hidden_size
    attn = 4 * args.num_hidden_layers * rows * seq * seq * args.hidden_size
    return 2 * tokens * n_params_body + head + attn


def measure_variant(
    path: str, setting: str, rows: int, prompt: int, completion: int, decode_tokens: tuple, backward: bool
) -> dict:
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm import load
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from mlx_xpo_plugin.compute import decode, precision
    from mlx_xpo_plugin.compute.scoring import completion_logps, pack

    model, _ = load(path)
    precision.apply(model, setting, "model", log=lambda s: None)
    weight_bytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    emb = model.model.embed_tokens
    n_emb = emb.weight.shape[0] * model.args.hidden_size
    n_body = sum(
        v.size
        for k, v in tree_flatten(model.parameters())
        if not k.startswith("model.embed_tokens") and k.endswith("weight") and v.ndim == 2
    )
    if any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules()):
        n_body = sum(
            m.weight.shape[0] * m.weight.shape[1] * 32 // m.bits
            for _, m in model.named_modules()
            if isinstance(m, nn.QuantizedLinear)
        )
    products = best_of(decode_products(model, rows), 3)
    model.freeze()
    linear_to_lora_layers(model, model.args.num_hidden_layers, {"rank": 8, "dropout": 0.0, "scale": 10.0})
    mx.eval(model.parameters())
    greedy = lambda lp: mx.argmax(lp, axis=-1)  # noqa: E731
    prompts = [[(7 * r + j) % 1500 + 3 for j in range(prompt)] for r in range(rows)]
    t1, t2 = (best_of(lambda n=n: decode.generate(model, prompts, n, greedy, []), 3) for n in decode_tokens)
    per_token = (t2 - t1) / (decode_tokens[1] - decode_tokens[0])
    comps = [[(13 * r + 5 * j) % 1500 + 3 for j in range(completion)] for r in range(rows)]
    inputs, targets, mask = pack(prompts, comps)
    seq = prompt + completion - 1
    fl = model_flops(model.args, rows * seq, rows * completion, rows, seq, n_body)
    fwd = best_of(lambda: mx.eval(completion_logps(model, inputs, targets, mask).tokens), 1)
    out = {
        "setting": setting,
        "weight_bytes": weight_bytes,
        "decode_s_per_token": per_token,
        "decode_products_s": products,
        "score_fwd_s": fwd,
        "score_fwd_gflops": fl / fwd / 1e9,
        "rows": rows,
        "n_emb": n_emb,
    }
    if backward:

        def pol():
            def loss(m):
                return completion_logps(m, inputs, targets, mask, temperature=0.8).sum.sum()

            v, g = nn.value_and_grad(model, loss)(model)
            mx.eval(v, g)

        t = best_of(pol, 1)
        out.update(policy_s=t, policy_gflops=2 * fl / t / 1e9)
    return out


def render(data: dict) -> str:
    m = data["machine_rates"]
    lines = [
        f"Machine: {B.machine_line(data['machine'])}.",
        f"BLAS libraries mapped in this process: {', '.join(data.get('blas_mapped', [])) or 'not recorded'}.",
        f"Preset {data['preset']}; {data['rounds']} rounds; medians [min-max].",
        "",
        "| rate measured in this process | median [min–max] |",
        "|---|---|",
    ]
    for k, label in (
        ("sgemm_gflops", "float32 sgemm GFLOP/s"),
        ("bf16_gemm_gflops", "bfloat16 matmul GFLOP/s"),
        ("q4_f32act_gflops", "4-bit quantized_matmul (float32 activations) GFLOP/s"),
        ("q4_bf16act_gflops", "4-bit quantized_matmul (bfloat16 activations and scales, as shipped) GFLOP/s"),
        ("read_gbs", "read bandwidth GB/s, MLX sum (one thread)"),
        ("read_gbs_one_core", "read bandwidth GB/s, numpy sum in one thread"),
        ("read_gbs_all_cores", "read bandwidth GB/s, numpy sum in one thread per core"),
    ):
        if k not in m:
            continue
        lines.append(f"| {label} | {B.fmt(B.median(m[k]), 1)} [{B.fmt(min(m[k]), 1)}–{B.fmt(max(m[k]), 1)}] |")
    lines += [
        "",
        "| checkpoint | compute_dtype | weights GB | decode ms/token (rows) | its products alone, ms "
        "| floor ms/token | decode / floor | floor at one core's bandwidth | decode / that floor "
        "| scoring fwd GFLOP/s (rows) | vs sgemm | policy fwd+bwd GFLOP/s | vs sgemm |",
        "|" + "---|" * 13,
    ]
    sg = B.median(m["sgemm_gflops"])
    bw = max(B.median(m["read_gbs"]), B.median(m.get("read_gbs_all_cores") or [0.0]))
    bw1 = B.median(m.get("read_gbs_one_core") or [None])
    for name, runs in data["variants"].items():

        def med(k):
            vals = [r[k] for r in runs if r.get(k) is not None]
            return (B.median(vals), min(vals), max(vals)) if vals else (None, None, None)

        wb = runs[0]["weight_bytes"]
        dec = med("decode_s_per_token")
        floor = wb / (bw * 1e9)
        fw, pol = med("score_fwd_gflops"), med("policy_gflops")

        def rng(t, nd=1, k=1.0):
            if t[0] is None:
                return "–"
            return f"{B.fmt(t[0] * k, nd)} [{B.fmt(t[1] * k, nd)}–{B.fmt(t[2] * k, nd)}]"

        ckpt, setting = name.split(":")
        lines.append(
            f"| {ckpt} | {setting} | {wb / 1e9:.2f} | {rng(dec, 0, 1e3)} ({runs[0]['rows']}) | "
            f"{rng(med('decode_products_s'), 0, 1e3)} | {floor * 1e3:.0f} | "
            f"{B.fmt(dec[0] / floor, 2)} | {B.fmt(wb / bw1 / 1e6 if bw1 else None, 0)} | "
            f"{B.fmt(dec[0] * bw1 * 1e9 / wb if bw1 else None, 2)} | "
            f"{rng(fw)} ({runs[0]['rows']}) | {B.fmt(fw[0] / sg, 2)} | "
            f"{rng(pol)} | {B.fmt(pol[0] / sg, 2) if pol[0] else '–'} |"
        )
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="q05")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--native-rows", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=40)
    ap.add_argument("--completion", type=int, default=32)
    # 4bit:native is left out by default: its products run at the q4_bf16act rate of the first
    # table (a fraction of a GFLOP/s here), i.e. seconds per decoded token and minutes per scoring pass
    ap.add_argument("--variants", default="bf16:auto,bf16:native,4bit:auto")
    ap.add_argument("--name", default="limits")
    ap.add_argument("--render-only", action="store_true")
    ns = ap.parse_args()
    if ns.render_only:
        return B.rerender(ns.name, render)
    from mlx_xpo_plugin.cpu import fast_blas

    fast_blas.preload()  # the BLAS our commands run on (before mlx.core)
    from mlx_xpo_plugin.commands.tiny import PRESETS

    p = PRESETS[ns.preset]
    paths = {"bf16": build(ns.preset, None), "4bit": build(ns.preset, 4)}
    variants = [v for v in ns.variants.split(",") if v]
    data = {
        "preset": ns.preset,
        "rounds": ns.rounds,
        "machine": B.machine(),
        "load_before": B.loadavg(),
        "machine_rates": {},
        "variants": {v: [] for v in variants},
    }
    for r in range(ns.rounds):
        for k, v in machine_rates(p["hidden_size"], p["intermediate_size"], 5).items():
            data["machine_rates"].setdefault(k, []).append(v)
        for v in variants if r % 2 == 0 else variants[::-1]:
            ckpt, setting = v.split(":")
            native = setting == "native"
            res = measure_variant(
                paths[ckpt],
                setting,
                ns.native_rows if native else ns.rows,
                ns.prompt,
                ns.completion,
                (8, 40),
                backward=not native,
            )
            print(v, {k: round(x, 4) if isinstance(x, float) else x for k, x in res.items()}, flush=True)
            data["variants"][v].append(res)
    data["load_after"] = B.loadavg()
    data["blas_mapped"] = sorted(
        {line.split()[-1] for line in open("/proc/self/maps") if "blas" in line.lower() and len(line.split()) >= 6}
    )
    j, md = B.write_results(ns.name, data, render(data))
    print(f"wrote {j} and {md}")


if __name__ == "__main__":
    main()

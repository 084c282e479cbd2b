"""Where a scoring forward pass spends its time, at a real model size.

    python bench/bench_scoring.py                  # q05 (Qwen2.5-0.5B's shape), bf16 checkpoint, auto
    python bench/bench_scoring.py --rounds 5

The checkpoint is loaded as a run loads it (``compute_dtype: auto``: float32 on the CPU) and scored
as the reference pass scores it: ``completion_logps`` of 4 rows (40 prompt + 32 completion tokens).
Per round, alternating the order of the parts, each the best of 3:

* the whole pass; the transformer layers (``model.model``); the output layer at completion
  positions; the vocabulary-wide log-softmax and the gather of the targets (``scoring._reduce``);
* one layer at the pass's shape, and its parts: attention (with its norm), the MLP, the MLP's three
  matrix products alone, and the SwiGLU activation (``silu(gate) * up``) alone;
* elementwise rates over a tensor the size of the MLP's activations: MLX's ``exp``, numpy's ``exp``
  (the same bytes), and an ``exp`` written in MLX operations (the same Cephes polynomial as MLX's,
  compiled with ``mx.compile``): its time and how far it is from MLX's ``exp``, and the SwiGLU
  activation computed with it;
* the float32 sgemm rate at the MLP's shape (bench_limits.sgemm_gflops), for the GFLOP/s of the
  MLP's products.

Output: bench/results/scoring.json, .md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as B  # noqa: E402
from bench_limits import load_as_run, sgemm_gflops  # noqa: E402

from mlx_xpo_plugin.commands.calibration import best_of  # noqa: E402

LOG2E = 1.442695
CEPHES = (1.535336188319500e-4, 1.339887440266574e-3, 9.618437357674640e-3, 5.550332471162809e-2)
CEPHES += (2.402264791363012e-1, 6.931472028550421e-1, 1.0)


def exp_in_mlx_ops(x):
    """exp(x) = 2**i * p(f), i = round(x log2 e), f the rest, p MLX's polynomial (mul + add, no fma)."""
    import mlx.core as mx

    y = x * LOG2E
    i = mx.floor(y + 0.5)
    f = y - i
    p = CEPHES[0]
    for c in CEPHES[1:]:
        p = p * f + c
    r = mx.left_shift(i.astype(mx.int32) + 127, 23).view(mx.float32) * p
    return mx.where(x > 88.0, mx.inf, mx.where(x < -88.0, 0.0, r))


def parts(model, rows: int, prompt: int, completion: int, reverse: bool) -> dict:
    """seconds of each part (see the module's docstring), best of 3, in reverse order if ``reverse``."""
    import mlx.core as mx
    import numpy as np
    from mlx_lm.models.activations import swiglu
    from mlx_lm.models.base import create_attention_mask

    from mlx_xpo_plugin.compute.scoring import _reduce, _split, completion_logps, first_completion_position, pack

    prompts = [[(7 * r + j) % 1500 + 3 for j in range(prompt)] for r in range(rows)]
    comps = [[(13 * r + 5 * j) % 1500 + 3 for j in range(completion)] for r in range(rows)]
    inputs, targets, mask = pack(prompts, comps)
    start = first_completion_position(mask)
    backbone, head = _split(model)
    hidden = backbone(inputs)[:, start:]
    logits = head(hidden)
    layer = model.model.layers[0]
    x = mx.random.normal((rows, inputs.shape[1], model.args.hidden_size))
    gate, up = layer.mlp.gate_proj(x), layer.mlp.up_proj(x)
    attn_mask = create_attention_mask(x, None)
    big = mx.random.normal(gate.shape) * 4
    mx.eval(hidden, logits, x, gate, up, big)
    big_np = np.array(big)
    fast_exp = mx.compile(exp_in_mlx_ops)
    fast_swiglu = mx.compile(lambda g, u: g / (1 + exp_in_mlx_ops(-g)) * u)

    def mlp_products():
        return layer.mlp.gate_proj(x), layer.mlp.up_proj(x), layer.mlp.down_proj(gate)

    timed = {
        "pass": lambda: completion_logps(model, inputs, targets, mask).tokens,
        "layers": lambda: backbone(inputs),
        "output layer": lambda: head(hidden),
        "log-softmax and gather": lambda: _reduce(logits, targets[:, start:], False, None)[0],
        "one layer": lambda: layer(x, attn_mask, None),
        "attention": lambda: layer.self_attn(layer.input_layernorm(x), attn_mask, None),
        "MLP": lambda: layer.mlp(x),
        "MLP products": lambda: mx.eval(*mlp_products()),
        "SwiGLU activation": lambda: swiglu(gate, up),
        "SwiGLU activation, exp in MLX ops": lambda: fast_swiglu(gate, up),
        "exp, MLX": lambda: mx.exp(big),
        "exp, MLX ops (compiled)": lambda: fast_exp(big),
    }
    order = list(timed.items())[::-1] if reverse else timed.items()
    out = {name: best_of(lambda f=f: mx.eval(f()), 3) for name, f in order}
    out["exp, numpy"] = best_of(lambda: np.exp(big_np), 3)
    exact, fast = mx.exp(big), fast_exp(big)
    out["fast_exp_max_rel_diff"] = (mx.abs(exact - fast) / mx.abs(exact)).max().item()
    out["fast_exp_same_bits"] = (exact == fast).mean().item()
    out["elements"] = big.size
    out["mlp_flop"] = 3 * 2 * x.shape[0] * x.shape[1] * gate.shape[-1] * x.shape[-1]
    return out


def render(data: dict) -> str:
    runs = data["runs"]

    def col(name):
        return [r[name] for r in runs]

    def cell(xs, k=1e3, nd=1):
        return f"{B.fmt(B.median(xs) * k, nd)} [{B.fmt(min(xs) * k, nd)}–{B.fmt(max(xs) * k, nd)}]"

    whole, layer, n = B.median(col("pass")), B.median(col("one layer")), data["layers"]
    lines = [
        f"Machine: {B.machine_line(data['machine'])}.",
        f"Preset {data['preset']} ({n} layers), bf16 checkpoint, compute_dtype auto (float32); "
        f"{data['rows']} rows x ({data['prompt']} + {data['completion']}) tokens; {len(runs)} rounds, "
        f"each part best of 3; medians [min–max]. float32 sgemm at the MLP's shape: "
        f"{B.fmt(B.median(data['sgemm_gflops']), 0)} GFLOP/s.",
        "",
        "| part | ms | share |",
        "|---|---|---|",
    ]
    for name in ("pass", "layers", "output layer", "log-softmax and gather"):
        lines.append(f"| {name} | {cell(col(name))} | {B.median(col(name)) / whole:.0%} of the pass |")
    for name in (
        "one layer",
        "attention",
        "MLP",
        "MLP products",
        "SwiGLU activation",
        "SwiGLU activation, exp in MLX ops",
    ):
        lines.append(f"| {name} | {cell(col(name))} | {B.median(col(name)) / layer:.0%} of a layer |")
    per = {k: [r[k] / r["elements"] * 1e9 for r in runs] for k in ("exp, MLX", "exp, numpy", "exp, MLX ops (compiled)")}
    mlp_rate = [r["mlp_flop"] / r["MLP products"] / 1e9 for r in runs]
    lines += [
        "",
        f"The MLP's products run at {B.fmt(B.median(mlp_rate), 0)} GFLOP/s. Element rates over "
        f"{runs[0]['elements']:,} float32 values, ns per element: "
        + "; ".join(f"{k} {cell(v, 1, 2)}" for k, v in per.items())
        + f". The exp in MLX operations differs from MLX's by up to {max(col('fast_exp_max_rel_diff')):.1e} "
        f"(relative); {B.median(col('fast_exp_same_bits')):.0%} of its values have the same bits.",
    ]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="q05")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=40)
    ap.add_argument("--completion", type=int, default=32)
    ap.add_argument("--name", default="scoring")
    ap.add_argument("--render-only", action="store_true")
    ns = ap.parse_args()
    if ns.render_only:
        return B.rerender(ns.name, render)
    model = load_as_run(ns.preset)
    model.eval()
    from mlx_xpo_plugin.commands.tiny import PRESETS
    from mlx_xpo_plugin.cpu import fast_blas

    p = PRESETS[ns.preset]
    data = {
        "preset": ns.preset,
        "rows": ns.rows,
        "prompt": ns.prompt,
        "completion": ns.completion,
        "layers": len(model.model.layers),
        "machine": B.machine(),
        "blas": fast_blas.banner_line(),
        "load_before": B.loadavg(),
        "sgemm_gflops": [],
        "runs": [],
    }
    for r in range(ns.rounds):
        data["sgemm_gflops"].append(sgemm_gflops(p["hidden_size"], p["intermediate_size"], 5))
        data["runs"].append(parts(model, ns.rows, ns.prompt, ns.completion, r % 2 == 1))
        print(
            r,
            {
                k: round(v * 1e3, 1)
                for k, v in data["runs"][-1].items()
                if not k.startswith(("fast_exp", "elements", "mlp_flop"))
            },
        )
    data["load_after"] = B.loadavg()
    j, md = B.write_results(ns.name, data, render(data))
    print(md.read_text())


if __name__ == "__main__":
    main()

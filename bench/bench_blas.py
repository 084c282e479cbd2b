"""Matrix-product speed of MLX on Linux CPUs under each candidate BLAS (GFLOP/s of float32 products).

    python bench/bench_blas.py                       # bundled reference vs scipy-openblas32 (vs system OpenBLAS)
    python bench/bench_blas.py --rounds 7 --lib debian=/tmp/x/libopenblas.so.0
    python bench/bench_blas.py --lib cmeel=/tmp/x/libgfortran.so.5,/tmp/y/libopenblas.so.0

Each measurement is a fresh process (one BLAS per process: the first library that defines
``cblas_sgemm`` in the global scope is the one MLX calls); the candidates alternate round by round,
so drift in machine load hits all alike. A process multiplies each shape ``--reps`` times after one
warm-up and keeps the median; the table shows the median over rounds with the min-max of the rounds.
``--lib NAME=A,B`` loads A then B with RTLD_GLOBAL (B the BLAS, A what it needs first);
``--lib NAME=prefix:scipy_:PATH`` forwards ``scipy_``-prefixed names (mlx_xpo_plugin.cpu.blas_shim).
Rate = 2 m k n / time. Nothing here goes through the start-up hook (MLX_XPO_PLUGIN=0).

``--step``: instead, whole training steps of our xpo on the small preset (bench_step.py's
settings: batch 2, ``--length`` tokens, the model as its own judge), one run per BLAS per round
(``MLX_XPO_BLAS`` names it; a ``--lib`` entry's last path), step 1 of each run left out; the
table shows the median over rounds of each run's median step [min-max].

Output: bench/results/blas.json|md (``--step``: blas_step.json|md; ``--name`` another name).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

#: (m, k, n): a Qwen2-0.5B MLP product of 256 rows, and the small preset's scoring (176 rows),
#: LM-head and decode (4 rows) products
SHAPES = [(256, 896, 4864), (176, 256, 768), (176, 256, 2048), (4, 256, 768)]


def child(spec: str, reps: int) -> dict:
    """Load the candidate, then time MLX's float32 products (runs in the measured process)."""
    if spec.startswith("prefix:"):
        _, prefix, path = spec.split(":", 2)
        from mlx_xpo_plugin.cpu import blas_shim

        blas_shim.forward(path, prefix)
    elif spec:
        for path in spec.split(","):
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    import mlx.core as mx
    import numpy as np

    rng = np.random.default_rng(0)
    out = {}
    for m, k, n in SHAPES:
        a, b = rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((k, n), dtype=np.float32)
        A, B = mx.array(a), mx.array(b)
        err = float(np.abs(np.array(A @ B) - a @ b).max() / np.abs(a @ b).max())
        inner = max(1, int(2e8 // (2 * m * k * n)))  # ~0.2 GFLOP per timed call
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            for _ in range(inner):
                mx.eval(A @ B)
            times.append((time.perf_counter() - t) / inner)
        times.sort()
        out[f"{m}x{k}x{n}"] = {"gflops": 2 * m * k * n / times[len(times) // 2] / 1e9, "rel_err": err}
    paths = {l.split(None, 5)[-1] for l in open("/proc/self/maps").read().splitlines() if len(l.split()) > 5}
    out["mapped"] = sorted(
        {
            os.path.basename(p)
            for p in paths  # the BLAS-like libraries (and our shim)
            if any(w in p.lower() for w in ("blas", "mkl", "shim", "lapack"))
        }
    )
    return out


def candidates(ns) -> dict:
    cands = {"bundled reference": ""}
    try:
        import scipy_openblas32 as so  # optional here: the candidate is skipped without it

        cands["scipy-openblas32"] = "prefix:scipy_:" + os.path.join(so.get_lib_dir(), so.get_library(True))
    except ImportError:
        pass
    found = ctypes.util.find_library("openblas")
    if found:
        cands["system OpenBLAS"] = found
    for item in ns.lib:
        name, _, spec = item.partition("=")
        cands[name] = spec
    for item in ns.env:  # a candidate named only here: the scipy-openblas32 one with other settings
        name = item.partition("=")[0]
        if name not in cands and "scipy-openblas32" in cands:
            cands[name] = cands["scipy-openblas32"]
    return cands


def machine_text() -> str:
    import _common as B

    return B.machine_line(B.machine()).split("; BLAS under MLX")[0]  # the candidates are the subject here


def render_products(d: dict) -> str:
    import _common as B

    keys = [f"{m}x{k}x{n}" for m, k, n in SHAPES]
    rows = []
    for name, rs in d["runs"].items():
        cells = []
        for k in keys:
            g = [x[k]["gflops"] for x in rs]
            cells.append(f"{B.median(g):.1f} [{min(g):.1f}-{max(g):.1f}]")
        mapped = [
            m
            for m in rs[0]["mapped"]
            if any(w in m.lower() for w in ("blas", "mkl", "lapack"))
            and not m.startswith(("libblas-", "liblapack-"))
            and "openblas64_" not in m
        ]  # not MLX's, NumPy's
        if "(deleted)" in rs[0]["mapped"] or any("shim" in m for m in rs[0]["mapped"]):
            mapped.append("mlx-xpo-blas-shim (memfd)")
        rows.append([name, *cells, f"{max(x[k]['rel_err'] for x in rs for k in keys):.1e}", ", ".join(mapped)])
    threads = d.get("threads") or "each library's default"
    return (
        f"# MLX float32 matrix products per BLAS (GFLOP/s)\n\n{d['machine']}\n\n"
        f"Threads: {threads}. {len(next(iter(d['runs'].values())))} rounds, one process per candidate per "
        f"round, alternating; median over rounds [min-max]; each value is the median of {d['reps']} timed "
        "calls after a warm-up. Rate = 2 m k n / time.\n\n"
        + B.md_table(
            ["BLAS", *keys, "max rel. error vs NumPy", "BLAS libraries mapped (besides MLX's and NumPy's own)"], rows
        )
    )


def render_steps(d: dict) -> str:
    import _common as B

    runs, ns = d["runs"], d["settings"]
    first = next(iter(runs))
    base = B.median([x["step_seconds"] for x in runs[first]])
    rows = []
    for name, rs in runs.items():
        v = [x["step_seconds"] for x in rs]
        env = ", ".join(f"{k}={val}" for k, val in d.get("envs", {}).get(name, {}).items())
        rows.append(
            [
                name + (f" ({env})" if env else ""),
                f"{B.median(v):.3f} [{min(v):.3f}-{max(v):.3f}]",
                f"{base / B.median(v):.1f}x",
                rs[0]["blas"] or "bundled reference BLAS",
            ]
        )
    return (
        f"# Training step time per BLAS: our xpo, {ns['preset']} preset, {ns['length']}-token completions\n\n"
        f"{d['machine']}\n\n{ns['rounds']} rounds, one run of {ns['iters']} steps per BLAS per round, "
        f"alternating; step 1 left out; median over rounds of each run's median step [min-max].\n\n"
        + B.md_table(["BLAS", "s/step", f"speed-up vs {first}", "the run's BLAS line"], rows)
    )


def steps(ns, cands: dict) -> int:
    """--step: alternating training runs of ours, one per BLAS per round."""
    import tempfile
    from pathlib import Path

    import _common as B
    from bench_step import settings_for

    libs = {name: ("off" if not spec else spec.rsplit(":", 1)[-1].split(",")[-1]) for name, spec in cands.items()}
    envs = {}
    for item in ns.env:  # NAME=K=V
        name, _, kv = item.partition("=")
        envs.setdefault(name, {}).update([kv.split("=", 1)])
    base_env = dict(os.environ)
    work = Path(tempfile.mkdtemp(prefix="bench-blas-"))
    runs = {name: [] for name in libs}
    for r in range(ns.rounds):
        for name in list(libs) if r % 2 == 0 else list(libs)[::-1]:
            os.environ.clear()
            os.environ.update(base_env, MLX_XPO_BLAS=libs[name], **envs.get(name, {}))
            res = B.run_one(
                "ours",
                "xpo",
                settings_for("ours", "xpo", ns.preset, ns.length, ns.iters),
                work / f"{r}-{len(runs[name])}-{abs(hash(name))}",
            )
            wall = [x["wall_seconds"] for x in res["steps"] if x.get("iteration", 0) > 1 and x.get("wall_seconds")]
            runs[name].append(
                {
                    "step_seconds": B.median(wall),
                    "all": wall,
                    "blas": res.get("blas"),
                    "mapped": res.get("blas_libraries_mapped"),
                }
            )
            print(f"round {r + 1}: {name}: {runs[name][-1]['step_seconds']:.3f} s/step ({res.get('blas')})", flush=True)
    os.environ.clear()
    os.environ.update(base_env)
    B.cleanup(work)
    d = {"machine": machine_text(), "libs": libs, "envs": envs, "runs": runs, "settings": vars(ns)}
    md = render_steps(d)
    B.write_results(ns.name or "blas_step", d, md)
    print(md)
    return 0


def main() -> int:
    from _common import rerender, write_results

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--lib", action="append", default=[], help="NAME=PATH[,PATH] or NAME=prefix:P:PATH")
    ap.add_argument(
        "--env",
        action="append",
        default=[],
        help="NAME=K=V: an environment variable of a "
        "candidate (--step; a NAME not otherwise known is scipy-openblas32 with it)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="OPENBLAS_NUM_THREADS (and MKL's) of every candidate (products only; default: each library's own)",
    )
    ap.add_argument("--step", action="store_true", help="time training steps instead of products")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--iters", type=int, default=4)
    ap.add_argument("--name", default=None, help="results file name (default: blas, or blas_step)")
    ap.add_argument("--render-only", action="store_true", help="rewrite NAME.md from NAME.json, run nothing")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ns = ap.parse_args()
    if ns.child is not None:
        print(json.dumps(child(ns.child, ns.reps)))
        return 0
    if ns.render_only:
        rerender(ns.name or ("blas_step" if ns.step else "blas"), render_steps if ns.step else render_products)
        return 0
    cands = candidates(ns)
    if ns.step:
        return steps(ns, cands)
    env = {**os.environ, "MLX_XPO_PLUGIN": "0"}
    if ns.threads:
        env.update(OPENBLAS_NUM_THREADS=str(ns.threads), MKL_NUM_THREADS=str(ns.threads))
    runs = {name: [] for name in cands}
    for r in range(ns.rounds):
        for name in list(cands) if r % 2 == 0 else list(cands)[::-1]:
            p = subprocess.run(
                [sys.executable, __file__, "--child", cands[name], "--reps", str(ns.reps)],
                env=env,
                capture_output=True,
                text=True,
                timeout=900,
            )
            if p.returncode:
                raise SystemExit(f"{name}: status {p.returncode}\n{p.stderr[-2000:]}")
            runs[name].append(json.loads(p.stdout.strip().splitlines()[-1]))
            print(
                f"round {r + 1}: {name}: "
                + ", ".join(f"{s} {runs[name][-1][s]['gflops']:.1f}" for s in runs[name][-1] if s != "mapped"),
                flush=True,
            )
    d = {"machine": machine_text(), "threads": ns.threads, "reps": ns.reps, "candidates": cands, "runs": runs}
    md = render_products(d)
    j, m = write_results(ns.name or "blas", d, md)
    print(md)
    print(f"\nwrote {j} and {m}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

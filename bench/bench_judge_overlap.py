"""An endpoint judge across the network: step time when the step waits for the judge, then runs
the reference pass, against the judge answering in a thread while the reference pass computes
(overlapped: what an endpoint judge does, loop/overlap.py).

    python bench/bench_judge_overlap.py                 # delays 0.5, 1, 2 s; 2 runs per side each
    python bench/bench_judge_overlap.py --quick         # delay 1 s, 1 run per side, 4 steps
    python bench/bench_judge_overlap.py --delays 1 --repeats 3 --mode online_dpo

A server process on 127.0.0.1 (this script with ``--serve DELAY``) answers every chat-completions
request after DELAY seconds: "0" or "1" for the response with more letters e, "1" when they have
as many. The runs are made in one process through the Python API, as a user makes them (the fast
BLAS under MLX), on the ``small`` preset's random model (hidden 256, 4 layers, vocabulary 2048)
with batch_size 4 (the judge's 4 requests go out at once: a judge call takes about DELAY) and
completions of --length tokens, a shape where the reference pass takes about a second here.
Three sides, alternating (A B C, C B A, ...): "overlapped"; "judge first", the same passes with
the judge answering before the reference pass starts (``judge_while`` replaced by a plain call);
"before", ``HTTPJudge.concurrent = False``: the judge, then the reference pass on the pairs kept,
as every judge ran before and a judge that is not concurrent runs. Step 1 of every run is left
out; a run's value is the median over its other steps. Every run starts from the same seed; the
overlapped run's adapters are compared with the others' (sha256 of adapters.safetensors, and
the largest difference of a weight from the "before" run's: the reference pass in the samples'
order rounds differently under OpenBLAS, see loop/overlap.py).

Output: bench/results/judge_overlap.json (every step) and bench/results/judge_overlap.md.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as B  # noqa: E402

SIDES = ("overlapped", "judge first", "before")
KEYS = ("step_seconds", "time/rollout", "time/judge", "time/reference", "time/overlapped", "time/policy")


def serve(delay: float) -> None:
    """The endpoint: prints its port, then answers every request after ``delay`` seconds."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    shown = re.compile(r"Response 0:\n(.*?)\n\nResponse 1:\n(.*?)\n\nBetter response", re.DOTALL)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            a, b = shown.search(body["messages"][1]["content"]).groups()
            time.sleep(delay)
            answer = "0" if a.count("e") > b.count("e") else "1"
            reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print(f"PORT {server.server_address[1]}", flush=True)
    server.serve_forever()


@contextlib.contextmanager
def endpoint(delay: float):
    p = subprocess.Popen([sys.executable, __file__, "--serve", str(delay)], stdout=subprocess.PIPE, text=True)
    try:
        port = int(p.stdout.readline().split()[1])
        yield f"http://127.0.0.1:{port}"
    finally:
        p.terminate()
        p.wait()


def one_run(side: str, url: str, ns, work: Path) -> dict:
    """One training run in this process; its steps' numbers and the adapters' hash."""
    from mlx_xpo_plugin.api import train_method
    from mlx_xpo_plugin.judges.http import HTTPJudge
    from mlx_xpo_plugin.loop import trainer
    from mlx_xpo_plugin.online_dpo_trainer import OnlineDPO
    from mlx_xpo_plugin.xpo_trainer import XPO

    ad = Path(tempfile.mkdtemp(dir=work))
    s = B.ours_settings(B.model_path("small"), ns.length, ns.iters, judge=url, batch_size=4, adapter_path=str(ad))
    s["judge_config"] = {"timeout": 60, "max_retries": 0}
    if ns.mode == "xpo":
        s["alpha"] = 1e-5
    overlapped = trainer.judge_while
    HTTPJudge.concurrent = side != "before"
    if side == "judge first":
        trainer.judge_while = lambda judge, reference_pass: (judge(), 0.0)
    try:
        with open(work / "log.txt", "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            status = train_method(XPO if ns.mode == "xpo" else OnlineDPO, s, progress=False)
    finally:
        HTTPJudge.concurrent, trainer.judge_while = True, overlapped
    if status != 0:
        raise SystemExit(f"a {side} run exited with status {status}; see {work / 'log.txt'}")
    rows = [json.loads(line) for line in open(ad / "metrics.jsonl")]
    steps = [{k: r.get(k, 0.0) for k in KEYS} for r in rows if "step_seconds" in r and r["step"] > 1]
    digest = hashlib.sha256((ad / "adapters.safetensors").read_bytes()).hexdigest()
    out = {"steps": steps, "adapters_sha256": digest, **{k: B.median([x[k] for x in steps]) for k in KEYS}}
    return out, str(ad / "adapters.safetensors")


def largest_difference(a: str, b: str) -> float:
    import mlx.core as mx

    wa, wb = mx.load(a), mx.load(b)
    return max(float(mx.abs(wa[k] - wb[k]).max().item()) for k in wa)


def render(data: dict) -> str:
    lines = [
        "## An endpoint judge beside the reference pass",
        "",
        *B.header(
            data,
            f"Mode {data['mode']}, preset small, batch_size 4, completions of {data['length']} tokens, "
            f"{data['iters']} steps per run (step 1 left out), {data['repeats']} runs per side and delay. "
            "Medians over runs [min-max of the run medians], seconds per step.",
        ),
    ]
    head = [
        "delay (s)",
        "step, before",
        "step, judge first",
        "step, overlapped",
        "saved",
        "time/judge",
        "time/reference",
        "min(judge, reference)",
        "time/overlapped",
        "judge + reference, wall: before / overlapped",
        "adapters = judge first",
        "largest weight difference from before",
    ]
    rows = []
    for c in data["cells"]:
        seq, first, ovl = c["before"], c["judge first"], c["overlapped"]

        def med(side, k):
            return B.median([r[k] for r in side])

        def rng(side, k):
            xs = [r[k] for r in side]
            return f"{B.median(xs):.2f} [{min(xs):.2f}-{max(xs):.2f}]"

        judge, ref = med(seq, "time/judge"), med(seq, "time/reference")

        def wall(side):  # per step: the judge's and the reference pass's seconds, less their overlap
            runs = [[x["time/judge"] + x["time/reference"] - x["time/overlapped"] for x in r["steps"]] for r in side]
            return B.median([B.median(r) for r in runs])

        rows.append(
            [
                c["delay"],
                rng(seq, "step_seconds"),
                rng(first, "step_seconds"),
                rng(ovl, "step_seconds"),
                f"{med(seq, 'step_seconds') - med(ovl, 'step_seconds'):.2f}",
                f"{judge:.2f} / {med(ovl, 'time/judge'):.2f}",
                f"{ref:.2f} / {med(ovl, 'time/reference'):.2f}",
                f"{min(judge, ref):.2f}",
                f"{med(ovl, 'time/overlapped'):.2f}",
                f"{wall(seq):.2f} / {wall(ovl):.2f}",
                "yes" if c["adapters_equal"] else "**no**",
                f"{c['largest_difference']:.1e}",
            ]
        )
    lines += [
        B.md_table(head, rows),
        "",
        "time/judge and time/reference: before / overlapped. saved: before's median step minus overlapped's, "
        "to be compared with min(judge, reference), what overlapping can save at most. time/overlapped: the "
        "seconds the judge and the reference pass ran at once (counted in both). judge + reference, wall: "
        "per step time/judge + time/reference - time/overlapped, the seconds the two phases took together "
        "(the rollout's and the policy pass's spread left out).",
        "",
    ]
    return B.with_method(lines, data)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--serve", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--delays", default="0.5,1,2", help="seconds the endpoint takes per request (default 0.5,1,2)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per side and delay (default 2)")
    ap.add_argument("--iters", type=int, default=5, help="steps per run, the first left out (default 5)")
    ap.add_argument("--length", type=int, default=128, help="completion tokens (default 128)")
    ap.add_argument("--mode", default="xpo", choices=("xpo", "online_dpo"))
    ap.add_argument("--quick", action="store_true", help="delay 1 s, 1 run per side, 4 steps")
    ap.add_argument("--render-only", action="store_true", help="rewrite the .md from the .json")
    ns = ap.parse_args()
    if ns.serve is not None:
        return serve(ns.serve)
    if ns.render_only:
        return B.rerender("judge_overlap", render)
    if ns.quick:
        ns.delays, ns.repeats, ns.iters = "1", 1, 4
    import mlx_xpo_plugin.api  # noqa: F401  (first: the fast BLAS goes under MLX as in a user's run)

    data = B.session("bench_judge_overlap.py")
    data.update(mode=ns.mode, length=ns.length, iters=ns.iters, repeats=ns.repeats, cells=[])
    data["method"] = __doc__.split("\n\n", 2)[2].rsplit("\n\nOutput:", 1)[0]
    work = Path(tempfile.mkdtemp(prefix="bench-judge-overlap-"))
    for delay in (float(x) for x in ns.delays.split(",")):
        cell = {"delay": delay, **{side: [] for side in SIDES}, "hashes": [], "differences": []}
        with endpoint(delay) as url:
            for r in range(ns.repeats):
                pair, files = {}, {}
                for side in SIDES if r % 2 == 0 else SIDES[::-1]:
                    t0 = time.perf_counter()
                    res, files[side] = one_run(side, url, ns, work)
                    cell[side].append(res)
                    pair[side] = res["adapters_sha256"]
                    print(
                        f"[judge_overlap] delay {delay:.1f} s {side:11s} #{r}: step {res['step_seconds']:.2f} s, "
                        f"judge {res['time/judge']:.2f}, reference {res['time/reference']:.2f}, "
                        f"overlapped {res['time/overlapped']:.2f} ({time.perf_counter() - t0:.0f} s)",
                        flush=True,
                    )
                cell["hashes"].append(pair)
                cell["differences"].append(largest_difference(files["overlapped"], files["before"]))
        cell["adapters_equal"] = all(p["judge first"] == p["overlapped"] for p in cell["hashes"])
        cell["largest_difference"] = max(cell["differences"])
        data["cells"].append(cell)
    B.finish("judge_overlap", "judge_overlap", data, render, work, show=True)


if __name__ == "__main__":
    main()

"""Run every benchmark in sequence (``make bench``), then refresh the results section of
bench/README.md from bench/results/*.md.

    python bench/run_all.py                   # everything
    python bench/run_all.py --quick           # shorter settings where a script has them
    python bench/run_all.py --only step,scaling
    python bench/run_all.py --skip learning

Order: bench_step.py, bench_scaling.py, bench_judge.py (when present), then any other
bench/bench_*.py except the optional bench_trl.py and bench_q05.py (TRL's 1.5 GB environment:
``--only trl``, ``--only q05``).
Each script runs in its own process; a failing script is reported and the others still run; the
exit status is non-zero when any failed.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
FIRST = ["step", "scaling", "judge"]
QUICK_ARGS = {
    "step": ["--quick"],
    "scaling": ["--batches", "1,2,4", "--lengths", "16,64", "--iters", "4"],
    "judge": ["--repeats", "3"],
    "judge_overlap": ["--quick"],
    "learning": ["--seeds", "1"],
    "startup": ["--runs", "5"],
    "blas": ["--rounds", "2"],
    "exploration": ["--quick"],
    "limits": ["--rounds", "1"],
    "vocab": ["--rounds", "2", "--completion", "128"],
    "prefill": ["--prompts", "64,256", "--rounds", "2", "--tokens", "8"],
}
#: scripts left out unless named in --only, and why
OPTIONAL = {
    "trl": "builds its own 1.5 GB virtual environment (torch + TRL); run it with --only trl",
    "q05": "needs bench_trl.py's environment and about 40 minutes (it runs bench_limits.py too); --only q05",
}
START, END = "<!-- results:start -->", "<!-- results:end -->"


def scripts() -> list[str]:
    names = [p.stem[len("bench_") :] for p in BENCH.glob("bench_*.py")]
    return [n for n in FIRST if n in names] + sorted(n for n in names if n not in FIRST)


def refresh_readme(names: list[str]) -> bool:
    """Replace the text between the results markers of bench/README.md by the latest tables."""
    readme = BENCH / "README.md"
    if not readme.exists():
        return False
    text = readme.read_text()
    if START not in text or END not in text:
        return False
    parts = []
    for n in names:
        md = RESULTS / f"{n}.md"
        if md.exists():
            body = md.read_text().strip()
            body = re.sub(r"^(#+) ", lambda m: "#" + m.group(1) + " ", body, flags=re.M)  # nest headings
            parts.append(f"### `bench_{n}.py` → `results/{n}.md`\n\n{body}\n")
    new = text.split(START)[0] + START + "\n\n" + "\n".join(parts) + "\n" + END + text.split(END, 1)[1]
    readme.write_text(new)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma list of names (step, scaling, judge, ...)")
    ap.add_argument("--skip", default="", help="comma list of names to leave out")
    ap.add_argument("--quick", action="store_true", help="shorter settings where a script has them")
    ap.add_argument("--no-readme", action="store_true", help="do not touch bench/README.md")
    ap.add_argument("--readme-only", action="store_true", help="only refresh bench/README.md from results/*.md")
    ns = ap.parse_args(argv)
    if ns.readme_only:
        return 0 if refresh_readme(scripts()) else 1
    todo = scripts()
    if ns.only:
        want = [x.strip() for x in ns.only.split(",") if x.strip()]
        todo = [n for n in todo if n in want]
    else:
        for n in [n for n in todo if n in OPTIONAL]:
            print(f"(bench_{n}.py is optional: it {OPTIONAL[n]})")
            todo.remove(n)
    skip = {x.strip() for x in ns.skip.split(",") if x.strip()}
    todo = [n for n in todo if n not in skip]
    status, t_all = {}, time.perf_counter()
    for n in todo:
        cmd = [sys.executable, str(BENCH / f"bench_{n}.py")] + (QUICK_ARGS.get(n, []) if ns.quick else [])
        print(f"\n=== {' '.join(cmd[1:])}", flush=True)
        t = time.perf_counter()
        rc = subprocess.call(cmd)
        status[n] = (rc, time.perf_counter() - t)
        print(f"=== bench_{n}.py: {'ok' if rc == 0 else f'FAILED (status {rc})'} in {status[n][1]:.0f} s", flush=True)
    if not ns.no_readme and refresh_readme(scripts()):
        print("\nupdated the results section of bench/README.md")
    print(f"\nall benchmarks: {time.perf_counter() - t_all:.0f} s")
    for n, (rc, secs) in status.items():
        print(f"  bench_{n}.py  {'ok' if rc == 0 else f'FAILED ({rc})':12s} {secs:6.0f} s")
    return 0 if all(rc == 0 for rc, _ in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

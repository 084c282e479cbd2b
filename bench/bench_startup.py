"""Start-up cost of mlx_xpo_plugin.pth (path 2) for programs that never import mlx_lm_lora.train.

    python bench/bench_startup.py [--runs 20] [--cli]

Method. The sound A/B is "same interpreter, same start-up code, one .pth file skipped": both
arms start with ``-S`` (no automatic ``site``) and then run ``site.main()``, which does exactly
what a normal start-up does (site-packages, every .pth, sitecustomize); the only difference is a
filter on ``site.addpackage`` that skips ``mlx_xpo_plugin.pth`` in the "without" arm and a file
name that does not exist in the "with" arm. Renaming the .pth instead would disturb other users
of a shared site-packages. Runs of all arms are interleaved (ABAB...) so that drift in machine
load hits them alike; medians are reported. Plain ``python -c pass`` with and without
``MLX_XPO_PLUGIN=0`` is shown too (with it, the .pth line only reads one environment variable).
``python -X importtime`` gives the import time of our two start-up modules directly.
Byte-code: where PYTHONDONTWRITEBYTECODE is set and no __pycache__ exists (an editable checkout),
every start-up compiles our two modules from source; a wheel install has them pre-compiled by pip.
So everything is measured twice: as the environment is, and with byte-code caching on
(PYTHONPYCACHEPREFIX pointing at a temporary folder, so the repository is not written to).
``--cli`` also times ``mlx_lm_lora.train --help`` with activation on and off (MLX_XPO_PLUGIN=0):
the cost paid by the program that does import mlx_lm_lora.train (plugin loading, our registry).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARM = (
    "import site; _add = site.addpackage; "
    "site.addpackage = lambda d, n, k: None if n == {skip!r} else _add(d, n, k); site.main()"
)
ARMS = {
    "with .pth": [sys.executable, "-S", "-c", ARM.format(skip="no-such-file.pth")],
    "without .pth": [sys.executable, "-S", "-c", ARM.format(skip="mlx_xpo_plugin.pth")],
    "python -c pass": [sys.executable, "-c", "pass"],
    "python -c pass, MLX_XPO_PLUGIN=0": [sys.executable, "-c", "pass"],
}


PYC: dict = {}  # extra environment of the current configuration


def env_for(name: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MLX_XPO_PLUGIN"}
    if PYC:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env.update(PYC)
    if "MLX_XPO_PLUGIN=0" in name:
        env["MLX_XPO_PLUGIN"] = "0"
    return env


def time_once(cmd, env) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def bench(arms: dict, runs: int) -> dict:
    times = {name: [] for name in arms}
    for name, cmd in arms.items():  # warm-up (disk cache, .pyc)
        time_once(cmd, env_for(name))
    for _ in range(runs):
        for name, cmd in arms.items():
            times[name].append(time_once(cmd, env_for(name)))
    return times


def importtime() -> dict:
    """Cumulative import time (us) of our start-up modules, from python -X importtime."""
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "pass"], env=env_for(""), capture_output=True, text=True
    )
    out = {}
    for line in r.stderr.splitlines():
        parts = [p.strip() for p in line.split("|")]
        if len(parts) == 3 and parts[2].strip().startswith("mlx_xpo_plugin"):
            out[parts[2].strip()] = int(parts[1])
    return out


def report(times: dict) -> None:
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    for k, v in times.items():
        print(f"  {k:34s} median {med[k]:7.2f} ms   (min {min(v) * 1e3:6.2f}, max {max(v) * 1e3:6.2f}, n={len(v)})")
    print(
        f"  => cost of the .pth: {med['with .pth'] - med['without .pth']:+.2f} ms "
        f"(difference of medians; on a busy machine, +-1 ms is noise)"
    )
    for mod, us in importtime().items():
        print(f"  -X importtime: {mod:28s} {us:6d} us cumulative")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--cli", action="store_true", help="also time mlx_lm_lora.train --help")
    a = ap.parse_args()
    import site

    pth = [Path(d, "mlx_xpo_plugin.pth") for d in site.getsitepackages() if Path(d, "mlx_xpo_plugin.pth").exists()]
    print(f"python {sys.version.split()[0]} at {sys.executable}")
    print(f".pth: {pth[0] if pth else 'NOT INSTALLED (both arms measure the same thing)'}")
    with tempfile.TemporaryDirectory() as cache:
        for label, extra in (("as the environment is", {}), ("with byte-code caching", {"PYTHONPYCACHEPREFIX": cache})):
            PYC.clear()
            PYC.update(extra)
            dont = "PYTHONDONTWRITEBYTECODE" in env_for("")
            print(f"{label} (PYTHONDONTWRITEBYTECODE {'set' if dont else 'unset'}):")
            report(bench(ARMS, a.runs))
        PYC.clear()
    if a.cli:
        script = str(Path(sys.executable).parent / "mlx_lm_lora.train")
        cli = {
            "mlx_lm_lora.train --help (activation on)": [script, "--help"],
            "mlx_lm_lora.train --help, MLX_XPO_PLUGIN=0": [script, "--help"],
        }
        t = bench(cli, max(3, a.runs // 4))
        for k, v in t.items():
            print(f"  {k:44s} median {statistics.median(v) * 1e3:8.1f} ms (n={len(v)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

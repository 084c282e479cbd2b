"""A fast BLAS under MLX on Linux CPUs.

The Linux ``mlx[cpu]`` wheel bundles the *reference* (netlib) BLAS
(``site-packages/mlx_cpu.libs/libblas-*.so``). Its ``cblas_sgemm`` ran at 3-5 GFLOP/s on this
project's 2-core test machine, where OpenBLAS ran the same products at 60-170 GFLOP/s, and
matrix products are most of a training step (rollout, judge, scoring and backward alike).

MLX calls BLAS through the dynamic linker, and a library loaded into the process's *global*
symbol scope before ``mlx.core`` is loaded takes precedence over the bundled one. So when
``mlx.core`` is first imported, the start-up hook (:mod:`mlx_xpo_plugin._bootstrap`) calls
:func:`preload`, which loads, with ``RTLD_GLOBAL``:

* the file named by ``MLX_XPO_BLAS`` (``MLX_XPO_BLAS=off`` keeps the bundled BLAS), else
* the system's OpenBLAS if there is one (Debian/Ubuntu: ``apt install libopenblas0-pthread``;
  Fedora: ``dnf install openblas``),

and only where it helps: on Linux, with the reference BLAS bundled in the installed mlx.
Nothing is loaded on macOS (Accelerate) or with a CUDA build. Any failure leaves MLX exactly as
shipped and is said once, on one stderr line. Standard library only: this runs at import time.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys

ENV = "MLX_XPO_BLAS"
_OFF = ("0", "false", "no", "off", "bundled", "reference")
HINT = ("install OpenBLAS (Debian/Ubuntu: apt install libopenblas0-pthread) and it is used "
        f"automatically, or set {ENV}=/path/to/libopenblas.so")

#: what happened, for the run's banner: {"blas": what MLX multiplies with, "loaded": the preloaded
#: file or None, "why": the reason for the choice}
STATE: dict = {}


def bundled_reference_blas(site_dir: str | None = None) -> str | None:
    """The reference BLAS the Linux mlx[cpu] wheel bundles, or None (macOS, CUDA, other builds)."""
    if sys.platform != "linux":
        return None
    if site_dir is None:
        mlx = sys.modules.get("mlx")
        paths = list(getattr(mlx, "__path__", None) or [])
        if not paths:
            return None
        site_dir = os.path.dirname(os.path.abspath(paths[0]))
    found = sorted(glob.glob(os.path.join(site_dir, "mlx_cpu.libs", "libblas*.so*")))
    return found[0] if found else None


def choose(env: dict | None = None) -> tuple[str | None, str]:
    """(library to load or None, why): ``MLX_XPO_BLAS`` first, then the system's OpenBLAS."""
    env = os.environ if env is None else env
    value = env.get(ENV, "").strip()
    if value.lower() in _OFF:
        return None, f"{ENV}={value}: the bundled reference BLAS is kept"
    if value:
        if not os.path.isfile(value):
            return None, f"{ENV}={value!r} is not a file; the bundled reference BLAS is kept"
        return value, f"{ENV}={value}"
    name = ctypes.util.find_library("openblas")
    if name is None:
        return None, "no OpenBLAS found: " + HINT
    return name, "the system's OpenBLAS"


def preload() -> dict:
    """Load the chosen BLAS globally, before ``mlx.core``; returns (and keeps) :data:`STATE`."""
    if STATE:
        return STATE
    bundled = bundled_reference_blas()
    if bundled is None or "mlx.core" in sys.modules:
        STATE.update(blas="as shipped with mlx", loaded=None, why="")
        return STATE
    path, why = choose()
    STATE.update(blas="bundled reference BLAS (slow)", loaded=None, why=why)
    if path is None and os.environ.get(ENV, "").strip().lower() not in _OFF + ("",):
        sys.stderr.write(f"mlx-xpo-plugin: {why}\n")  # a setting that names no file: say so at once
    if path is not None:
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            STATE.update(blas=f"{os.path.basename(path)} (preloaded for MLX)", loaded=path)
        except OSError as e:
            STATE["why"] = f"{why}: could not be loaded ({e}); the bundled reference BLAS is kept"
            sys.stderr.write(f"mlx-xpo-plugin: {STATE['why']}\n")
    return STATE


def banner_line() -> str | None:
    """One line for a run's banner on Linux CPUs (None where MLX's own BLAS is used)."""
    if not STATE or STATE.get("blas") == "as shipped with mlx":
        return None
    if STATE.get("loaded"):
        return f"BLAS: {STATE['blas']}"
    return f"BLAS: {STATE['blas']}: {STATE['why']}"

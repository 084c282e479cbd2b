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

While completions are decoded token by token, :func:`spare_core_for_python` keeps that OpenBLAS
on one core fewer than the process may use (see there).
"""

from __future__ import annotations

import contextlib
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


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the platform tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _openblas_threads(path: str | None):
    """(get, set) of the thread count of the OpenBLAS loaded from ``path``, or None."""
    if not path:
        return None
    try:
        lib = ctypes.CDLL(path)  # already loaded: the same handle
        get, put = lib.openblas_get_num_threads, lib.openblas_set_num_threads
    except (OSError, AttributeError):  # not an OpenBLAS (e.g. MLX_XPO_BLAS names another BLAS)
        return None
    get.restype, get.argtypes = ctypes.c_int, []
    put.restype, put.argtypes = None, [ctypes.c_int]
    return get, put


@contextlib.contextmanager
def spare_core_for_python():
    """Run the block with the preloaded OpenBLAS on at most ``usable_cores() - 1`` threads.

    Token-by-token decoding keeps two threads of the process busy: MLX's stream thread runs step
    t while the Python thread builds step t+1. A decode step's matrix products have one row per
    sequence, too few to gain from being split across threads, and OpenBLAS's idle workers spin
    (``sched_yield``) between calls, taking the core the Python thread needs. Measured on the
    2-core test machine (small preset with LoRA, 4 rows x 64 tokens, 8 alternating runs in one
    process): 605 -> 498 ms per rollout; the scoring forward/backward (87 tokens per row) did not
    gain, so the count goes back on exit. Pending MLX work is finished on entry and on exit, so
    the count never changes under a running product. A no-op unless this module preloaded an
    OpenBLAS.
    """
    api = _openblas_threads(STATE["loaded"]) if STATE.get("loaded") else None
    if api is None:
        yield
        return
    get, put = api
    before = get()
    wanted = max(1, min(before, usable_cores() - 1))
    if wanted == before:
        yield
        return
    import mlx.core as mx  # loaded by now: a BLAS is only preloaded for it

    mx.synchronize()
    put(wanted)
    try:
        yield
    finally:
        mx.synchronize()
        put(before)

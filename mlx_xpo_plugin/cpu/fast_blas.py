"""A fast BLAS under MLX on Linux CPUs.

The Linux ``mlx[cpu]`` wheel bundles the *reference* (netlib) BLAS
(``site-packages/mlx_cpu.libs/libblas-*.so``), many times slower than OpenBLAS on the same
products (bench/results/blas.md), and matrix products are most of a training step (rollout,
judge, scoring and backward alike).

MLX calls BLAS through the dynamic linker, and a routine put into the process's *global* symbol
scope before ``mlx.core`` is loaded takes precedence over the bundled one. So when ``mlx.core``
is first imported, the start-up hook (:mod:`mlx_xpo_plugin.host._bootstrap`) calls
:func:`preload`, which loads the first of:

* the file named by ``MLX_XPO_BLAS`` (``MLX_XPO_BLAS=off`` keeps the bundled BLAS);
* the system's OpenBLAS (Debian/Ubuntu: ``apt install libopenblas0-pthread``; Fedora: ``dnf
  install openblas``);
* the OpenBLAS of the ``scipy-openblas32`` wheel, a dependency of this package on Linux x86-64 and
  AArch64 (no root needed), which exports its routines with a ``scipy_`` prefix;

and :mod:`.blas_shim` puts the plain names MLX imports in the global scope, bound to that
library's routines, except ``cblas_sgemm``: that is :mod:`.skinny`'s kernel, which computes the
products of 1-8 rows that decoding is made of and hands every other product to the library.

It does so only where it helps: on Linux, with the reference BLAS bundled in the installed mlx, and
(by default) in processes that run this project's commands: those that import ``mlx_lm_lora.train``
(its console script, ``python -m``), run ``mlx-xpo``, import :mod:`mlx_xpo_plugin.api`, or import
``mlx.core`` through this package's modules, before anything else imported ``mlx.core``.
``MLX_XPO_BLAS_SCOPE=all`` applies it to every MLX process of the environment. Nothing is loaded on
macOS (Accelerate, Metal) or with a CUDA build. Any failure leaves MLX exactly as shipped; in this
project's commands the run's banner says why (:func:`banner_line`), elsewhere one stderr line does.
Standard library only: this runs at import time.

While completions are decoded token by token, :func:`decoding_threads` runs that OpenBLAS on every
usable core, and at every rollout cuts the decoding and scoring counts to the cores other
processes leave idle (see there).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import glob
import os
import sys
from importlib.machinery import PathFinder

from mlx_xpo_plugin.cpu import blas_shim, skinny
from mlx_xpo_plugin.host import startup
from mlx_xpo_plugin.host.startup import OFF_VALUES

ENV = "MLX_XPO_BLAS"
SCOPE_ENV = "MLX_XPO_BLAS_SCOPE"
SCOPES = ("commands", "all")
PIP_PACKAGE = "scipy-openblas32"
PREFIXES = ("", "scipy_")  # how a candidate may name cblas_sgemm
_OFF = OFF_VALUES + ("bundled", "reference")
HINT = (
    f"pip install {PIP_PACKAGE} (no root needed), or install OpenBLAS (Debian/Ubuntu: apt install "
    f"libopenblas0-pthread), and it is used automatically; or set {ENV}=/path/to/libopenblas.so"
)

#: what happened, for the run's banner: {"blas": what MLX multiplies with, "loaded": the preloaded
#: file or None, "prefix": of its routine names, "why": the reason for the choice}
STATE: dict = {}
_LIB = []  # the loaded library's handle (for its thread-count functions)
_REQUESTED = []  # non-empty once request() was called


def bundled_reference_blas(site_dir: str | None = None) -> str | None:
    """The reference BLAS the Linux mlx[cpu] wheel bundles, or None (macOS, CUDA, other builds).

    ``mlx`` is a namespace package: every folder named ``mlx`` on ``sys.path`` is part of it (MLX's
    own kernel cache ``$TMPDIR/mlx`` where the working directory is ``$TMPDIR``, a clone of its
    repository), so each of its folders is looked next to, in order."""
    if sys.platform != "linux":
        return None
    if site_dir is not None:
        folders = [site_dir]
    else:
        mlx = sys.modules.get("mlx")
        paths = list(getattr(mlx, "__path__", None) or [])
        if not paths:
            spec = PathFinder.find_spec("mlx")  # not imported yet: where it would come from
            paths = list(spec.submodule_search_locations or []) if spec else []
        folders = [os.path.dirname(os.path.abspath(p)) for p in paths]
    for folder in folders:
        found = sorted(glob.glob(os.path.join(folder, "mlx_cpu.libs", "libblas*.so*")))
        if found:
            return found[0]
    return None


def pip_openblas(path: list | None = None) -> str | None:
    """The library of the installed ``scipy-openblas32`` wheel, found without importing it."""
    spec = PathFinder.find_spec("scipy_openblas32", path)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        found = sorted(glob.glob(os.path.join(folder, "lib", "libscipy_openblas*.so")))
        if found:
            return found[0]
    return None


def choose(env: dict | None = None, system=None, pip=None) -> tuple[str | None, str]:
    """(library to load or None, why): ``MLX_XPO_BLAS``, the system's OpenBLAS, scipy-openblas32.

    ``system`` and ``pip`` find the last two (default: :func:`ctypes.util.find_library` and
    :func:`pip_openblas`); a test passes its own."""
    env = os.environ if env is None else env
    value = env.get(ENV, "").strip()
    if value.lower() in _OFF:
        return None, f"{ENV}={value}: the bundled reference BLAS is kept"
    if value:
        if not os.path.isfile(value):
            return None, f"{ENV}={value!r} is not a file; the bundled reference BLAS is kept"
        return value, f"{ENV}={value}"
    name = (system or (lambda: ctypes.util.find_library("openblas")))()
    if name is not None:
        return name, "the system's OpenBLAS"
    name = (pip or pip_openblas)()
    if name is not None:
        return name, f"the {PIP_PACKAGE} package"
    return None, "no OpenBLAS found: " + HINT


def request() -> None:
    """Mark this process as one that runs this project's commands: :func:`in_scope` says yes."""
    _REQUESTED.append(True)


def scope(env: dict | None = None) -> tuple[str, str | None]:
    """(``commands`` or ``all``, a one-line complaint about a bad ``MLX_XPO_BLAS_SCOPE`` or None)."""
    value = (os.environ if env is None else env).get(SCOPE_ENV, "").strip()
    if value.lower() in ("", *SCOPES):
        return (value.lower() or "commands"), None
    return "commands", (
        f"{SCOPE_ENV}={value!r} is not one of {', '.join(SCOPES)}; using commands (this project's commands only)"
    )


def _imported_by_us(frame) -> bool:
    """True when a module of this package (other than the start-up hook) is on the import stack."""
    while frame is not None:
        name = frame.f_globals.get("__name__") or ""
        if name.startswith("mlx_xpo_plugin") and name not in (
            "mlx_xpo_plugin.host._bootstrap",
            "mlx_xpo_plugin.cpu.fast_blas",
            "mlx_xpo_plugin.cpu.blas_shim",
        ):
            return True
        frame = frame.f_back
    return False


def in_scope(env: dict | None = None, frame=None) -> str | None:
    """Whether :func:`preload` applies to this process (see the module's docstring): ``"ours"``
    (one of this project's commands), ``"all"`` (``MLX_XPO_BLAS_SCOPE=all``) or None."""
    where, complaint = scope(env)
    if complaint:
        sys.stderr.write(f"mlx-xpo-plugin: {complaint}\n")
    if _REQUESTED or _imported_by_us(frame or sys._getframe(1)):
        return "ours"
    return "all" if where == "all" else None


def _exported_prefix(lib) -> str | None:
    for prefix in PREFIXES:
        try:
            getattr(lib, prefix + "cblas_sgemm")
            return prefix
        except AttributeError:
            continue
    return None


#: what OpenBLAS reads, when loaded, for how long idle workers spin: 2**value CPU cycles (4-30;
#: 28 when unset). Left as set: 20 measured 4% slower steps than 28 on an idle machine, and a busy
#: one gets one thread anyway (bench/results/threads_spin.md)
TIMEOUT_ENVS = ("OPENBLAS_THREAD_TIMEOUT", "GOTO_THREAD_TIMEOUT")


def _load(path: str) -> tuple[str, int | None]:
    """Load ``path`` and make its routines MLX's (:mod:`.blas_shim`), few-row products bound to
    :mod:`.skinny`'s kernel where it was built; returns (the routines' name prefix, the thread
    count set by :func:`all_cores` or None)."""
    lib = ctypes.CDLL(path)
    prefix = _exported_prefix(lib)
    if prefix is None:
        raise OSError(f"it exports no cblas_sgemm (nor {', '.join(p + 'cblas_sgemm' for p in PREFIXES if p)})")
    blas_shim.forward_loaded(lib, prefix, sgemm=skinny.attach(lib, prefix))
    threads = all_cores(lib, prefix) if prefix else None
    _LIB[:] = [lib]
    return prefix, threads


#: the environment variables OpenBLAS reads its thread count from (the user's choice wins)
THREAD_ENVS = ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS")


def all_cores(lib, prefix: str, env: dict | None = None) -> int | None:
    """Run a prefixed (pip) OpenBLAS on every usable core (its own count may be the machine's,
    beyond this process's affinity), unless the user set its thread count; returns the count set,
    or None. Every rollout cuts it to the cores other processes leave idle
    (:func:`decoding_threads`): a product split over a busy core waits for a time slice."""
    env = os.environ if env is None else env
    if any(env.get(k, "").strip() for k in THREAD_ENVS):
        return None
    api = _threads_api(lib, prefix)
    if api is None:
        return None
    get, put = api
    wanted = max(1, min(get(), usable_cores()))
    put(wanted)
    return wanted


def preload(quiet: bool = False) -> dict:
    """Load the chosen BLAS globally, before ``mlx.core``; returns (and keeps) :data:`STATE`.

    A failure is written to stderr unless ``quiet`` (the start-up hook passes True in this
    project's commands, whose banner says it: :func:`banner_line`)."""
    if STATE:
        return STATE
    bundled = bundled_reference_blas()
    if bundled is None or "mlx.core" in sys.modules:
        why = "mlx.core was imported before the BLAS could be chosen" if bundled else ""
        STATE.update(blas="as shipped with mlx", loaded=None, prefix="", why=why)
        return STATE
    path, why = choose()
    STATE.update(blas="bundled reference BLAS (slow)", loaded=None, prefix="", why=why)
    failed = path is None and os.environ.get(ENV, "").strip().lower() not in _OFF + ("",)
    if path is not None:
        try:
            prefix, threads = _load(path)
            where = f"{why}; {threads} thread{'s' * (threads != 1)}" if threads else why
            STATE.update(prefix=prefix, loaded=path, blas=f"{os.path.basename(path)} (preloaded for MLX; {where})")
            STATE["threads"] = current_threads()  # the process's count, cut per phase later
            STATE["user_threads"] = any(os.environ.get(k, "").strip() for k in THREAD_ENVS)
        except OSError as e:
            STATE["why"] = f"{why}: could not be loaded ({e}); the bundled reference BLAS is kept"
            failed = True
    if failed and not quiet:
        sys.stderr.write(f"mlx-xpo-plugin: {STATE['why']}\n")
    return STATE


def banner_line() -> str | None:
    """One line for a run's banner on Linux CPUs (None where MLX's own BLAS is used)."""
    if not STATE and bundled_reference_blas() is not None:  # the hook was off or out of scope
        off = not startup.enabled()
        STATE.update(
            blas="bundled reference BLAS (slow)",
            loaded=None,
            prefix="",
            why="the start-up hook is off (MLX_XPO_PLUGIN=0)"
            if off
            else "mlx.core was imported before this package chose a BLAS (import mlx_xpo_plugin.api "
            f"before mlx, or set {SCOPE_ENV}=all)",
        )
    if not STATE or (STATE.get("blas") == "as shipped with mlx" and not STATE.get("why")):
        return None
    if STATE.get("loaded"):
        parts = [threads_line(), skinny.STATE.get("line")]
        return f"BLAS: {STATE['blas']}" + "".join(f"; {p}" for p in parts if p)
    return f"BLAS: {STATE['blas']}: {STATE['why']}"


def _runnable_self() -> int:  # threads of this process in state R now
    n = 0
    for stat in glob.glob("/proc/self/task/*/stat"):
        try:
            with open(stat) as f:
                n += f.read().rsplit(")", 1)[1].split()[0] == "R"
        except (OSError, IndexError):
            continue
    return n


def busy_elsewhere(samples: int = 3, gap_s: float = 0.0005) -> int:
    """Threads of other processes runnable now: the most, over ``samples`` reads ``gap_s`` apart,
    of /proc/loadavg's running count less this process's; 0 without /proc (macOS)."""
    import time

    most = 0
    for i in range(samples):
        try:
            with open("/proc/loadavg") as f:
                running = int(f.read().split()[3].split("/")[0])
        except (OSError, IndexError, ValueError):
            return 0
        most = max(most, running - _runnable_self())
        if i + 1 < samples:
            time.sleep(gap_s)
    return most


def fit_to_idle_cores(wanted: int, cores: int | None = None, busy: int | None = None) -> int:
    """``wanted`` threads, cut to the cores no other process keeps busy (at least one; unchanged
    when none is busy): a product
    split over threads waits for the slowest one, and a thread that shares its core with another
    process's waits for a scheduler time slice (docs/cost.md, "Threads": measured)."""
    cores = usable_cores() if cores is None else cores
    busy = busy_elsewhere() if busy is None else busy
    return max(1, min(wanted, cores - busy) if busy > 0 else wanted)


#: the thread counts last set per phase, for the run's banner
PHASE_THREADS: dict = {}
#: models whose weights are larger (more than a CPU's last-level cache) decode on every core
ALL_CORES_ABOVE = 64 * 2**20


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the platform tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _threads_api(lib, prefix: str = ""):
    """(get, set) of the thread count of the loaded OpenBLAS ``lib``, or None; ``prefix`` of its
    names (``scipy_openblas_set_num_threads`` in scipy-openblas32)."""
    try:
        get = getattr(lib, prefix + "openblas_get_num_threads")
        put = getattr(lib, prefix + "openblas_set_num_threads")
    except AttributeError:  # not an OpenBLAS (e.g. MLX_XPO_BLAS names another BLAS)
        return None
    get.restype, get.argtypes = ctypes.c_int, []
    put.restype, put.argtypes = None, [ctypes.c_int]
    return get, put


def current_threads() -> int | None:
    """The thread count of the preloaded OpenBLAS (None without one)."""
    api = _openblas_threads(STATE.get("loaded"), STATE.get("prefix", ""))
    return api[0]() if api else None


def _openblas_threads(path: str | None, prefix: str = ""):
    """(get, set) of the thread count of the OpenBLAS loaded from ``path``, or None."""
    if not path:
        return None
    try:
        lib = ctypes.CDLL(path)  # already loaded: the same handle
    except OSError:
        return None
    return _threads_api(lib, prefix)


@contextlib.contextmanager
def decoding_threads(weight_bytes: int | None = None):
    """Decode (the block) on every usable core when the model's weights exceed
    :data:`ALL_CORES_ABOVE`, else on at most one core fewer than the process's count (the user's
    count, where set, is used instead), then go back to the process's count for scoring; each cut
    to the cores other processes leave idle now (:func:`fit_to_idle_cores`). A decode step reads
    every weight once through products of a few rows: one thread reads a large model at a fraction
    of the memory's speed (bench/results/decode.md); a model that fits in the caches costs its
    operations, which threads only add to. MLX work is finished on entry and exit. A no-op
    unless this module preloaded an OpenBLAS."""
    api = _openblas_threads(STATE["loaded"], STATE.get("prefix", "")) if STATE.get("loaded") else None
    if api is None:
        yield
        return
    get, put = api
    before = STATE.get("threads") or get()  # the process's count, as set at load
    cores = usable_cores()
    big = weight_bytes is None or weight_bytes > ALL_CORES_ABOVE
    wanted = min(before, cores) if STATE.get("user_threads") else (cores if big else min(before, cores - 1))
    busy = busy_elsewhere() if max(before, wanted) > 1 else 0
    wanted, after = fit_to_idle_cores(wanted, cores, busy), fit_to_idle_cores(before, cores, busy)
    PHASE_THREADS.update(decoding=wanted, scoring=after)
    import mlx.core as mx  # loaded by now: a BLAS is only preloaded for it

    mx.synchronize()
    if get() != wanted:
        put(wanted)
    try:
        yield
    finally:
        mx.synchronize()
        if get() != after:
            put(after)


def threads_line() -> str | None:
    """Thread counts per phase of the preloaded OpenBLAS and its spin time, for the run's banner."""
    api = _openblas_threads(STATE.get("loaded"), STATE.get("prefix", "")) if STATE.get("loaded") else None
    if api is None:
        return None
    n = STATE.get("threads") or api[0]()
    cores = usable_cores()
    spin = next((os.environ[k].strip() for k in TIMEOUT_ENVS if os.environ.get(k, "").strip()), "28")
    user = STATE.get("user_threads")
    decoding = f"{min(n, cores)}" if user else f"{cores} ({max(1, cores - 1)} for weights under 64 MiB)"
    return (
        f"threads per phase of {cores} cores: scoring {n}, decoding {decoding}, fewer while "
        f"other processes keep cores busy; idle threads spin 2**{spin} cycles"
    )

"""The few-row product kernel (``skinny.c``) that decoding's matrix products run on.

A decode step multiplies a few activation rows by every weight matrix, and OpenBLAS streams the
weights of such a product at a fraction of the memory's speed (bench/results/decode.md). The
compiled extension ``_skinny`` (built on Linux by ``pip install``, optional: without a compiler
the package installs without it) has ``xpo_cblas_sgemm``, which computes
``C = alpha * A @ B.T + beta * C`` for 1-8 rows of ``A`` itself and hands every other product to
the BLAS's ``cblas_sgemm``. :func:`attach` returns its address, which :mod:`.blas_shim` binds to
MLX's ``cblas_sgemm``. Standard library only: this runs at import time, before ``mlx.core``.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
from importlib.machinery import EXTENSION_SUFFIXES

from mlx_xpo_plugin.host.startup import OFF_VALUES, ON_VALUES

#: products with fewer weights (N * K) than this go to the BLAS: the pool's hand-off costs more
DEFAULT_MIN_ELEMENTS = 1 << 15
#: ``MLX_XPO_FEW_ROW_KERNEL=off`` leaves every product to the BLAS (the fast BLAS stays)
ENV = "MLX_XPO_FEW_ROW_KERNEL"
#: what happened, for the run's banner: {"line": the banner's words, "isa": the copy chosen}
STATE: dict = {}
_LIB = []


def library_path(folder: str | None = None) -> str | None:
    """The built ``_skinny`` extension next to this module, or None (not built)."""
    folder = folder or os.path.dirname(os.path.abspath(__file__))
    for suffix in EXTENSION_SUFFIXES:
        found = sorted(glob.glob(os.path.join(folder, "_skinny" + suffix)))
        if found:
            return found[0]
    return None


def _address(lib, name: str) -> int | None:
    try:
        return ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
    except AttributeError:
        return None


def attach(blas: ctypes.CDLL, prefix: str, path: str | None = None, env: dict | None = None) -> int | None:
    """Give the kernel ``blas``'s sgemm (for every product it does not take) and thread count;
    returns the address of ``xpo_cblas_sgemm``, or None (switched off by :data:`ENV`, not built,
    not loadable: MLX then calls the BLAS's own). :data:`STATE` says which, for the banner."""
    value = (os.environ if env is None else env).get(ENV, "").strip()
    if value.lower() in OFF_VALUES:
        STATE.update(line=f"few-row products (decoding): the BLAS's ({ENV}={value})", isa=None)
        return None
    ignored = "" if value.lower() in ("",) + ON_VALUES else f"; {ENV}={value!r} is not one of on, off: ignored"
    path = path or library_path()
    if path is None:
        STATE.update(line="few-row products (decoding): the BLAS's (the _skinny extension was not built)", isa=None)
        return None
    try:
        lib = ctypes.CDLL(path)
    except OSError as e:
        STATE.update(line=f"few-row products (decoding): the BLAS's (_skinny could not be loaded: {e})", isa=None)
        return None
    lib.xpo_skinny_init.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.xpo_skinny_isa.restype = ctypes.c_char_p
    lib.xpo_skinny_tune.argtypes = [ctypes.c_long] * 3
    lib.xpo_skinny_counts.argtypes = [ctypes.POINTER(ctypes.c_long)]
    lib.xpo_skinny_init(_address(blas, prefix + "cblas_sgemm"), _address(blas, prefix + "openblas_get_num_threads"))
    isa = lib.xpo_skinny_isa().decode()
    _LIB[:] = [lib]
    STATE.update(line=f"few-row products (decoding): own kernel ({isa}){ignored}", isa=isa)
    return _address(lib, "xpo_cblas_sgemm")


def counts() -> tuple[int, int]:
    """(products the kernel computed, products it handed to the BLAS) so far in this process."""
    if not _LIB:
        return 0, 0
    out = (ctypes.c_long * 2)()
    _LIB[0].xpo_skinny_counts(out)
    return out[0], out[1]


def tune(min_elements: int = -1, per_thread_elements: int = -1, spin_iterations: int = -1) -> None:
    """Set the kernel's thresholds (a negative value keeps one): the smallest product it takes
    (N * K weights), the fewest weights per thread, and how many pauses an idle thread spins
    before it sleeps."""
    if _LIB:
        _LIB[0].xpo_skinny_tune(min_elements, per_thread_elements, spin_iterations)


@contextlib.contextmanager
def off():
    """Every product goes to the BLAS inside the block (benchmarks compare the two)."""
    import mlx.core as mx  # loaded by now: the kernel only exists under MLX

    mx.synchronize()
    tune(min_elements=1 << 62)
    try:
        yield
    finally:
        mx.synchronize()
        tune(min_elements=DEFAULT_MIN_ELEMENTS)

"""mlx_xpo_plugin.cpu.blas_shim: the in-memory ELF object that gives prefixed routines their plain names.
Each load runs in a fresh interpreter: a library loaded with RTLD_GLOBAL stays for the process."""

import json
import platform
import subprocess
import sys

import pytest

from mlx_xpo_plugin.cpu import blas_shim

linux_elf = pytest.mark.skipif(
    sys.platform != "linux" or platform.machine().lower() not in blas_shim._MACHINES,
    reason="the shim is built for Linux on x86-64 and AArch64",
)


def test_sysv_elf_hash():
    assert blas_shim.elf_hash(b"") == 0
    assert blas_shim.elf_hash(b"printf") == 0x077905A6  # the System V ABI's hash of a well-known name


def test_the_image_is_a_shared_object_for_the_machine():
    image = blas_shim.build({"cblas_sgemm": 0x1234}, machine="aarch64")
    assert image[:4] == b"\x7fELF" and image[4] == 2 and image[5] == 1  # ELF64, little-endian
    assert int.from_bytes(image[16:18], "little") == 3 and int.from_bytes(image[18:20], "little") == 183
    assert b"cblas_sgemm\0" in image and b"libmlx_xpo_blas_shim.so\0" in image


def test_an_unknown_machine_is_refused():
    with pytest.raises(OSError, match="no ELF shim for machine 'sparc64'"):
        blas_shim.build({"x": 1}, machine="sparc64")


LOAD = r"""
import ctypes, ctypes.util, json
from mlx_xpo_plugin.cpu import blas_shim
libc = ctypes.CDLL(ctypes.util.find_library("c"))
targets = {"mlx_xpo_test_strlen": libc.strlen, "mlx_xpo_test_abs": libc.abs}
blas_shim.load_global(blas_shim.build({n: ctypes.cast(f, ctypes.c_void_p).value for n, f in targets.items()}))
g = ctypes.CDLL(None)  # the global scope, as the dynamic linker sees it
same = all(ctypes.cast(getattr(g, n), ctypes.c_void_p).value == ctypes.cast(f, ctypes.c_void_p).value
           for n, f in targets.items())
g.mlx_xpo_test_abs.restype, g.mlx_xpo_test_abs.argtypes = ctypes.c_int, [ctypes.c_int]
print(json.dumps({"same": same, "strlen": g.mlx_xpo_test_strlen(b"hello"), "abs": g.mlx_xpo_test_abs(-7)}))
"""


@linux_elf
def test_the_plain_names_resolve_to_the_targets_and_calls_go_through():
    r = subprocess.run(
        [sys.executable, "-c", LOAD],
        capture_output=True,
        text=True,
        timeout=60,
        env={"MLX_XPO_PLUGIN": "0", "PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout) == {"same": True, "strlen": 5, "abs": 7}


def test_addresses_skips_what_the_library_lacks():
    class Lib:
        def __getattr__(self, name):
            raise AttributeError(name)

    assert blas_shim.addresses(Lib(), "scipy_") == {}
    with pytest.raises(OSError, match="no scipy_cblas_sgemm"):
        blas_shim.forward_loaded(Lib(), "scipy_")

"""Unprefixed BLAS/LAPACK names for a library that exports them with a prefix.

``scipy-openblas32`` (the OpenBLAS wheel that NumPy and SciPy build with) exports every routine
with a ``scipy_`` prefix (``scipy_cblas_sgemm``), so loading it does not put ``cblas_sgemm`` in
the process's symbol scope, and MLX keeps calling its bundled reference BLAS. This module writes,
in memory, a tiny ELF shared object that holds no code and no data: only a dynamic symbol table in
which each name MLX imports (``cblas_sgemm``, ``sgetrf_``, ...) is an *absolute* symbol
(``SHN_ABS``) whose value is the address the prefixed routine has in this process. Loaded with
``RTLD_GLOBAL`` before ``mlx.core``, the dynamic linker binds MLX's calls straight to OpenBLAS:
no trampoline, nothing between the two.

Why this is sound: glibc >= 2.28 does not add a library's load address to an ``SHN_ABS`` symbol's
value (glibc bug 19818), and the MLX Linux wheels need glibc >= 2.35. The object is built for the
running process (addresses differ between processes) in a ``memfd`` (nothing written to disk) or,
where that is refused, a temporary file removed right after loading. Standard library only: this
runs at import time.

Layout (ELF64, little-endian, x86-64 or AArch64): ELF header; program headers PT_LOAD (read-only:
headers, .hash, .dynsym, .dynstr), PT_LOAD (read-write: .dynamic, which glibc before 2.35 adjusts
in place), PT_DYNAMIC, PT_GNU_STACK (non-executable stack: without it glibc would try to make the
stack executable). SysV hash: ``h = (h << 4) + c; g = h & 0xf0000000; h ^= g >> 24; h &= ~g``.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
import tempfile

#: what the Linux mlx wheel imports from BLAS/LAPACK (``nm -D --undefined-only libmlx.so``),
#: plus the neighbours a future MLX is likely to call; a name the library lacks is skipped
NAMES = tuple(
    [
        f"cblas_{t}{op}"
        for t in "sdcz"
        for op in ("gemm", "gemv", "axpy", "dot", "scal")
        if not (t in "cz" and op == "dot")
    ]
    + [
        f"{t}{r}_"
        for t in "sdcz"
        for r in (
            "gemm",
            "gemv",
            "trsm",
            "syrk",
            "getrf",
            "getri",
            "getrs",
            "gesv",
            "potrf",
            "potrs",
            "geqrf",
            "gesdd",
            "gesvd",
            "geev",
            "trtri",
            "lange",
        )
    ]
    + [f"{t}{r}_" for t in "sd" for r in ("orgqr", "syevd", "syev", "ormqr")]
    + [f"{t}{r}_" for t in "cz" for r in ("ungqr", "heevd", "heev", "unmqr")]
)
_MACHINES = {"x86_64": 62, "amd64": 62, "aarch64": 183, "arm64": 183}  # e_machine
PAGE = 0x10000  # the largest page size of either architecture: segments never share a page


def elf_hash(name: bytes) -> int:
    h = 0
    for c in name:
        h = ((h << 4) + c) & 0xFFFFFFFF
        g = h & 0xF0000000
        h ^= g >> 24
        h &= ~g & 0xFFFFFFFF
    return h


def build(symbols: dict, soname: str = "libmlx_xpo_blas_shim.so", machine: str | None = None) -> bytes:
    """An ELF shared object whose dynamic symbols are ``{name: absolute address}``."""
    em = _MACHINES.get((machine or platform.machine()).lower())
    if em is None:
        raise OSError(f"no ELF shim for machine {machine or platform.machine()!r}")
    names = list(symbols)
    strtab = bytearray(b"\0")
    offsets = {}
    for n in [soname, *names]:
        offsets[n] = len(strtab)
        strtab += n.encode() + b"\0"
    nsym = len(names) + 1
    nbucket = max(1, nsym // 2)
    buckets, chains = [0] * nbucket, [0] * nsym
    for i, n in enumerate(names, start=1):  # chain each symbol in front of its bucket's list
        b = elf_hash(n.encode()) % nbucket
        chains[i], buckets[b] = buckets[b], i
    hashtab = struct.pack(f"<{2 + nbucket + nsym}I", nbucket, nsym, *buckets, *chains)
    symtab = bytearray(24)  # index 0: the null symbol
    for n in names:  # Elf64_Sym: name, info (GLOBAL FUNC), other, shndx (SHN_ABS), value, size
        symtab += struct.pack("<IBBHQQ", offsets[n], 0x12, 0, 0xFFF1, symbols[n], 0)

    nph = 4
    off_hash = 64 + 56 * nph
    off_sym = off_hash + len(hashtab)
    off_sym += -off_sym % 8
    off_str = off_sym + len(symtab)
    off_dyn = off_str + len(strtab)
    off_dyn += -off_dyn % 8
    dyn_vaddr = off_dyn + PAGE * (off_dyn // PAGE + 1)  # same offset in its page, a page further
    dynamic = b"".join(
        struct.pack("<qQ", tag, val)
        for tag, val in (
            (14, offsets[soname]),  # DT_SONAME
            (4, off_hash),
            (5, off_str),
            (6, off_sym),
            (10, len(strtab)),
            (11, 24),  # HASH STRTAB SYMTAB STRSZ SYMENT
            (0, 0),
        )
    )  # DT_NULL
    end = off_dyn + len(dynamic)

    def phdr(ptype, flags, off, vaddr, size, align):
        return struct.pack("<IIQQQQQQ", ptype, flags, off, vaddr, vaddr, size, size, align)

    header = struct.pack(
        "<4sBBBBB7xHHIQQQIHHHHHH",
        b"\x7fELF",
        2,
        1,
        1,
        0,
        0,  # 64-bit, LE, v1, SysV
        3,
        em,
        1,
        0,
        64,
        0,
        0,
        64,
        56,
        nph,
        64,
        0,
        0,
    )  # ET_DYN, no entry, no sections
    phdrs = (
        phdr(1, 4, 0, 0, off_dyn, PAGE)  # PT_LOAD r--
        + phdr(1, 6, off_dyn, dyn_vaddr, len(dynamic), PAGE)  # PT_LOAD rw-
        + phdr(2, 6, off_dyn, dyn_vaddr, len(dynamic), 8)  # PT_DYNAMIC
        + phdr(0x6474E551, 6, 0, 0, 0, 16)
    )  # PT_GNU_STACK rw-
    out = bytearray(end)
    for off, blob in (
        (0, header + phdrs),
        (off_hash, hashtab),
        (off_sym, symtab),
        (off_str, strtab),
        (off_dyn, dynamic),
    ):
        out[off : off + len(blob)] = blob
    return bytes(out)


def addresses(lib: ctypes.CDLL, prefix: str, names=NAMES) -> dict:
    """``{name: address of prefix+name in lib}`` for each name the library has."""
    found = {}
    for n in names:
        try:
            found[n] = ctypes.cast(getattr(lib, prefix + n), ctypes.c_void_p).value
        except AttributeError:
            continue
    return found


def load_global(image: bytes, name: str = "mlx-xpo-blas-shim") -> ctypes.CDLL:
    """dlopen ``image`` with RTLD_GLOBAL: from a memfd, else from a temporary file removed after."""
    try:
        fd = os.memfd_create(name, getattr(os, "MFD_CLOEXEC", 1))
    except (AttributeError, OSError):
        fd = None
    if fd is not None:
        try:
            os.write(fd, image)
            return ctypes.CDLL(f"/proc/self/fd/{fd}", mode=ctypes.RTLD_GLOBAL)
        except OSError:
            pass  # e.g. /proc not mounted: a file instead
        finally:
            os.close(fd)  # the loaded object keeps its own mapping
    with tempfile.NamedTemporaryFile(prefix=name, suffix=".so") as f:
        f.write(image)
        f.flush()
        return ctypes.CDLL(f.name, mode=ctypes.RTLD_GLOBAL)


def forward_loaded(lib: ctypes.CDLL, prefix: str, sgemm: int | None = None) -> int:
    """Put the ``prefix``-ed routines of the loaded ``lib`` in the global scope under their plain
    names, ``cblas_sgemm`` bound to ``sgemm`` where given (the few-row kernel, :mod:`.skinny`);
    returns how many names were forwarded."""
    found = addresses(lib, prefix)
    if "cblas_sgemm" not in found:
        raise OSError(f"it has no {prefix}cblas_sgemm")
    if sgemm is not None:
        found["cblas_sgemm"] = sgemm
    load_global(build(found))
    return len(found)


def forward(lib_path: str, prefix: str) -> tuple[ctypes.CDLL, int]:
    """Load ``lib_path`` and forward its ``prefix``-ed routines (:func:`forward_loaded`)."""
    lib = ctypes.CDLL(lib_path)
    return lib, forward_loaded(lib, prefix)

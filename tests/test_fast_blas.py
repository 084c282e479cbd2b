"""A fast BLAS under MLX on Linux CPUs (mlx_xpo_plugin.cpu.fast_blas): the choice, and in a fresh
interpreter that MLX's matrix products really go to the preloaded library and stay correct."""

import json
import os
import subprocess
import sys

import mlx.core  # noqa: F401  (bundled_reference_blas looks next to the imported mlx)
import pytest

from mlx_xpo_plugin.cpu import fast_blas, skinny

BUNDLED = fast_blas.bundled_reference_blas()
linux_cpu = pytest.mark.skipif(BUNDLED is None, reason="only the Linux mlx[cpu] wheel bundles the reference BLAS")


def test_off_keeps_the_bundled_blas():
    path, why = fast_blas.choose({"MLX_XPO_BLAS": "off"})
    assert path is None and "MLX_XPO_BLAS=off" in why


def test_a_named_file_that_does_not_exist_is_said_and_ignored(tmp_path):
    path, why = fast_blas.choose({"MLX_XPO_BLAS": str(tmp_path / "nope.so")})
    assert path is None and "nope.so" in why and "is not a file" in why


def test_a_named_file_is_chosen(tmp_path):
    f = tmp_path / "libfake.so"
    f.write_bytes(b"")
    assert fast_blas.choose({"MLX_XPO_BLAS": str(f)}) == (str(f), f"MLX_XPO_BLAS={f}")


def test_no_bundled_reference_blas_outside_linux_cpu_wheels(tmp_path):
    assert fast_blas.bundled_reference_blas(str(tmp_path)) is None


SYSTEM, PIP = "/usr/lib/libopenblas.so.0", "/venv/scipy_openblas32/lib/libscipy_openblas.so"


@pytest.mark.parametrize(
    "env, system, pip, expected",
    [
        ({}, SYSTEM, PIP, SYSTEM),  # the system's OpenBLAS stays the first choice
        ({}, None, PIP, PIP),  # else the pip-installed one
        ({}, None, None, None),  # else the bundled reference BLAS, with a hint
        ({"MLX_XPO_BLAS": "off"}, SYSTEM, PIP, None),
    ],
)
def test_discovery_order(env, system, pip, expected):
    path, why = fast_blas.choose(env, system=lambda: system, pip=lambda: pip)
    assert path == expected
    if expected is None and not env:
        assert "pip install scipy-openblas32" in why and "MLX_XPO_BLAS" in why


def test_a_named_file_wins_over_every_installed_blas(tmp_path):
    f = tmp_path / "libmine.so"
    f.write_bytes(b"")
    assert fast_blas.choose({"MLX_XPO_BLAS": str(f)}, system=lambda: SYSTEM, pip=lambda: PIP)[0] == str(f)


def test_the_pip_openblas_is_found_on_the_path_without_importing_it(tmp_path):
    lib = tmp_path / "scipy_openblas32" / "lib"
    lib.mkdir(parents=True)
    (tmp_path / "scipy_openblas32" / "__init__.py").write_text("raise RuntimeError('imported')\n")
    assert fast_blas.pip_openblas([str(tmp_path)]) is None  # the package without its library
    (lib / "libscipy_openblas.so").write_bytes(b"")
    assert fast_blas.pip_openblas([str(tmp_path)]) == str(lib / "libscipy_openblas.so")
    assert fast_blas.pip_openblas([str(tmp_path / "elsewhere")]) is None


@pytest.mark.parametrize(
    "value, where, complaint",
    [
        ("", "commands", False),
        ("all", "all", False),
        (" ALL ", "all", False),
        ("commands", "commands", False),
        ("everything", "commands", True),
    ],
)
def test_scope_setting(value, where, complaint):
    got, said = fast_blas.scope({"MLX_XPO_BLAS_SCOPE": value})
    assert got == where and (said is not None) == complaint
    if complaint:
        assert "MLX_XPO_BLAS_SCOPE='everything'" in said and "commands, all" in said and "\n" not in said


PROBE = r"""
import ctypes, json, sys
import numpy as np
import mlx.core as mx
from mlx_xpo_plugin.cpu import fast_blas

class DlInfo(ctypes.Structure):
    _fields_ = [("fname", ctypes.c_char_p), ("fbase", ctypes.c_void_p),
                ("sname", ctypes.c_char_p), ("saddr", ctypes.c_void_p)]

libdl = ctypes.CDLL(None)

def owner(name):  # the file whose routine the global scope's `name` is, or None
    try:
        address = ctypes.cast(getattr(libdl, name), ctypes.c_void_p)
    except AttributeError:
        return None  # not in the global scope: MLX uses the copy bundled in its own local scope
    info = DlInfo()
    libdl.dladdr(address, ctypes.byref(info))
    return info.fname.decode()

rng = np.random.default_rng(0)
a, b = rng.standard_normal((64, 96), dtype=np.float32), rng.standard_normal((96, 80), dtype=np.float32)
err = float(np.abs(np.array(mx.array(a) @ mx.array(b)) - a @ b).max())
m = rng.standard_normal((32, 32), dtype=np.float32) + 32 * np.eye(32, dtype=np.float32)
inv_err = float(np.abs(np.array(mx.linalg.inv(mx.array(m), stream=mx.cpu)) @ m - np.eye(32)).max())  # LAPACK
maps = open("/proc/self/maps").read()
x, w = rng.standard_normal((4, 512), dtype=np.float32), rng.standard_normal((256, 512), dtype=np.float32)
few_err = float(np.abs(np.array(mx.array(x) @ mx.array(w).T) - x @ w.T).max())  # the few-row kernel's
print(json.dumps({"state": fast_blas.STATE, "owner": owner("cblas_sgemv"), "sgemm_owner": owner("cblas_sgemm"),
                  "few_err": few_err, "max_abs_err": err, "inv_err": inv_err,
                  "shim_mapped": "mlx-xpo-blas-shim" in maps}))
"""


def probe(env, first="", scope="all", cwd=None):
    """PROBE in a fresh interpreter, after ``first``; ``scope``: MLX_XPO_BLAS_SCOPE (None: unset)."""
    e = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MLX_XPO_BLAS", "MLX_XPO_PLUGIN", "MLX_XPO_BLAS_SCOPE", "MLX_XPO_FEW_ROW_KERNEL")
    }
    if scope is not None:
        e["MLX_XPO_BLAS_SCOPE"] = scope
    r = subprocess.run(
        [sys.executable, "-c", first + "\n" + PROBE],
        capture_output=True,
        text=True,
        env={**e, **env},
        timeout=120,
        cwd=cwd,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return {**json.loads(r.stdout.strip().splitlines()[-1]), "stderr": r.stderr}


@linux_cpu
def test_the_named_blas_is_preloaded_globally_before_mlx_and_products_stay_correct():
    # the bundled reference BLAS itself is on every Linux CPU machine: load it by name
    out = probe({"MLX_XPO_BLAS": BUNDLED})
    assert out["state"]["loaded"] == BUNDLED
    assert os.path.realpath(out["owner"]) == os.path.realpath(BUNDLED)
    assert os.path.realpath(out["sgemm_owner"]) == os.path.realpath(SKINNY or BUNDLED)
    assert out["max_abs_err"] < 1e-3 and out["few_err"] < 1e-3


@linux_cpu
def test_a_folder_named_mlx_in_the_working_directory_does_not_hide_the_bundled_blas(tmp_path):
    """mlx is a namespace package: MLX's own kernel cache ($TMPDIR/mlx) or a clone of the mlx
    repository in the working directory comes first in its __path__ under ``python -c``/``-m``."""
    (tmp_path / "mlx" / "0.32.4").mkdir(parents=True)
    out = probe({}, cwd=tmp_path)
    assert out["state"]["loaded"] and out["state"]["blas"] != "as shipped with mlx", out["state"]
    assert out["max_abs_err"] < 1e-3


@linux_cpu
def test_off_leaves_mlx_as_shipped():
    out = probe({"MLX_XPO_BLAS": "off"})
    assert out["state"]["loaded"] is None and out["owner"] is None and out["sgemm_owner"] is None
    assert "bundled reference BLAS" in out["state"]["blas"] and out["max_abs_err"] < 1e-3


@linux_cpu
def test_plugin_off_means_no_preload():
    out = probe({"MLX_XPO_PLUGIN": "0"})
    assert out["state"] == {} and out["owner"] is None


@linux_cpu
def test_by_default_another_mlx_program_keeps_mlx_as_shipped():
    out = probe({}, scope=None)
    assert out["state"] == {} and out["owner"] is None and out["max_abs_err"] < 1e-3


@linux_cpu
@pytest.mark.parametrize(
    "first",
    [
        "import mlx_lm_lora.train",  # what its console script and python -m do
        "import mlx_xpo_plugin.commands.runner",  # our modules importing mlx.core
        "import mlx_xpo_plugin.api",  # the Python API, before the user's mlx
        "from mlx_xpo_plugin.cpu import fast_blas; fast_blas.request()",
    ],
)
def test_this_projects_commands_get_the_fast_blas_by_default(first):
    out = probe({"MLX_XPO_BLAS": BUNDLED}, first=first, scope=None)
    assert out["state"]["loaded"] == BUNDLED and os.path.realpath(out["owner"]) == os.path.realpath(BUNDLED)


PIP_LIB = fast_blas.pip_openblas()
SYSTEM_LIB = __import__("ctypes.util").util.find_library("openblas")
SKINNY = skinny.library_path()  # the few-row kernel, where this install built it


@linux_cpu
@pytest.mark.skipif(PIP_LIB is None, reason="scipy-openblas32 is not installed")
@pytest.mark.parametrize("named", [False, True])
def test_the_pip_openblas_takes_mlxs_products_through_the_shim(named):
    if not named and SYSTEM_LIB is not None:
        pytest.skip("a system OpenBLAS is installed: it is chosen first")
    out = probe({"MLX_XPO_BLAS": PIP_LIB} if named else {})
    assert out["state"]["loaded"] == PIP_LIB and out["state"]["prefix"] == "scipy_"
    assert os.path.realpath(out["owner"]) == os.path.realpath(PIP_LIB)  # MLX's cblas_sgemv is OpenBLAS's
    assert os.path.realpath(out["sgemm_owner"]) == os.path.realpath(SKINNY or PIP_LIB)  # sgemm: the kernel's
    assert out["shim_mapped"] and out["max_abs_err"] < 1e-3 and out["inv_err"] < 1e-3


@linux_cpu
@pytest.mark.skipif(PIP_LIB is None or SKINNY is None, reason="needs scipy-openblas32 and the built kernel")
def test_with_the_few_row_kernel_switched_off_mlx_multiplies_with_the_openblas_alone():
    if SYSTEM_LIB:
        pytest.skip("a system OpenBLAS is installed: it is chosen first")
    out = probe({"MLX_XPO_FEW_ROW_KERNEL": "off"})
    assert out["state"]["loaded"] == PIP_LIB
    assert os.path.realpath(out["sgemm_owner"]) == os.path.realpath(PIP_LIB)
    assert out["max_abs_err"] < 1e-3 and out["few_err"] < 1e-3


@linux_cpu
@pytest.mark.parametrize("setting", ["missing", "not-a-library"])
def test_a_failed_choice_is_said_once_in_our_commands(tmp_path, setting):
    bad = tmp_path / "libbad.so"
    if setting == "not-a-library":
        bad.write_text("not an ELF file")
    env = {k: v for k, v in os.environ.items() if k not in ("MLX_XPO_PLUGIN", "MLX_XPO_BLAS_SCOPE")}
    code = "import mlx_lm_lora.train\nfrom mlx_xpo_plugin.cpu import fast_blas\nprint(fast_blas.banner_line())"
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={**env, "MLX_XPO_BLAS": str(bad)}
    )
    assert r.returncode == 0, r.stderr[-2000:]
    said = "is not a file" if setting == "missing" else "could not be loaded"
    assert (r.stdout + r.stderr).count(said) == 1 and str(bad) in r.stdout


@linux_cpu
@pytest.mark.skipif(SYSTEM_LIB is None, reason="no system OpenBLAS on this machine")
def test_the_system_openblas_takes_the_matrix_products():
    out = probe({})
    assert "openblas" in os.path.basename(out["owner"]).lower()
    assert out["state"]["blas"].startswith("libopenblas") and out["max_abs_err"] < 1e-3


@linux_cpu
def test_a_setting_that_names_no_file_is_said_on_stderr_and_mlx_runs_as_shipped(tmp_path):
    out = probe({"MLX_XPO_BLAS": str(tmp_path / "missing.so")})
    assert "missing.so' is not a file" in out["stderr"] and out["owner"] is None
    assert out["state"]["loaded"] is None and out["max_abs_err"] < 1e-3


class FakeOpenBLAS:
    """openblas_get/set_num_threads of a library, recording every count set."""

    def __init__(self, threads):
        self.threads, self.history = threads, []

    def api(self, path, prefix=""):
        return (lambda: self.threads), self.put

    def put(self, n):
        self.threads = n
        self.history.append(n)


@pytest.fixture
def fake_openblas(monkeypatch):
    def make(threads, cores, busy=0, user=False):
        fake = FakeOpenBLAS(threads)
        monkeypatch.setitem(fast_blas.STATE, "loaded", "libopenblas.so.0")
        monkeypatch.setitem(fast_blas.STATE, "threads", threads)
        monkeypatch.setitem(fast_blas.STATE, "user_threads", user)
        monkeypatch.setattr(fast_blas, "_openblas_threads", fake.api)
        monkeypatch.setattr(fast_blas, "usable_cores", lambda: cores)
        monkeypatch.setattr(fast_blas, "busy_elsewhere", lambda: busy)
        return fake

    return make


@pytest.mark.parametrize(
    "threads, cores, user, inside",
    [(1, 2, False, 2), (15, 16, False, 16), (8, 16, True, 8), (1, 2, True, 1), (4, 1, True, 1), (1, 1, False, 1)],
)
def test_decoding_runs_on_every_core_or_the_users_count_and_restores_the_count(
    fake_openblas, threads, cores, user, inside
):
    fake = fake_openblas(threads, cores, user=user)
    with fast_blas.decoding_threads():
        assert fake.threads == inside
    assert fake.threads == threads
    assert fake.history == ([] if inside == threads else [inside, threads])  # nothing set when nothing changes


@pytest.mark.parametrize(
    "threads, cores, busy, inside, after",
    [(15, 16, 0, 16, 15), (15, 16, 4, 12, 12), (15, 16, 16, 1, 1), (1, 2, 1, 1, 1), (2, 2, 5, 1, 1)],
)
def test_threads_are_cut_to_the_cores_other_processes_leave_idle(fake_openblas, threads, cores, busy, inside, after):
    fake = fake_openblas(threads, cores, busy)
    with fast_blas.decoding_threads():
        assert fake.threads == inside
    assert fake.threads == after
    assert fast_blas.PHASE_THREADS == {"decoding": inside, "scoring": after}


def test_a_cut_count_goes_back_up_when_the_load_goes_away(fake_openblas, monkeypatch):
    fake = fake_openblas(3, 4, busy=3)
    with fast_blas.decoding_threads():
        assert fake.threads == 1
    assert fake.threads == 1
    monkeypatch.setattr(fast_blas, "busy_elsewhere", lambda: 0)
    with fast_blas.decoding_threads():
        assert fake.threads == 4
    assert fake.threads == 3


def test_busy_elsewhere_leaves_out_this_process_threads(monkeypatch):
    reads = iter(["0.5 0.5 0.5 3/200 1\n", "0.5 0.5 0.5 2/200 1\n"])
    real_open = open

    def fake_open(path, *a, **k):
        if path == "/proc/loadavg":
            import io

            return io.StringIO(next(reads))
        return real_open(path, *a, **k)

    monkeypatch.setattr("builtins.open", fake_open)
    monkeypatch.setattr(fast_blas, "_runnable_self", lambda: 1)
    assert fast_blas.busy_elsewhere(samples=2, gap_s=0) == 2  # the most of 3 - 1 and 2 - 1


def test_the_count_is_restored_when_the_block_raises(fake_openblas):
    fake = fake_openblas(3, 4)
    with pytest.raises(RuntimeError, match="boom"):
        with fast_blas.decoding_threads():
            assert fake.threads == 4
            raise RuntimeError("boom")
    assert fake.threads == 3


def test_no_preloaded_openblas_means_nothing_is_touched(monkeypatch):
    monkeypatch.setitem(fast_blas.STATE, "loaded", None)
    monkeypatch.setattr(fast_blas, "_openblas_threads", lambda path: pytest.fail("looked for OpenBLAS"))
    with fast_blas.decoding_threads():
        pass


def test_a_library_without_the_openblas_thread_api_is_left_alone():
    assert fast_blas._openblas_threads(None) is None
    libc = __import__("ctypes.util").util.find_library("c")
    assert fast_blas._openblas_threads(libc) is None  # loads, but has no openblas_set_num_threads


def test_a_model_that_fits_in_the_caches_decodes_on_one_core_fewer(tiny_model, fake_openblas, monkeypatch):
    from mlx_xpo_plugin.compute import decode, rollout

    model, tok = tiny_model
    fake = fake_openblas(3, 4)
    seen = []
    real = decode.generate
    monkeypatch.setattr(decode, "generate", lambda *a, **k: (seen.append(fake.threads), real(*a, **k))[1])
    out = rollout.sample_completions(model, tok, [[5, 6, 7]], 2, rollout.SamplingConfig(max_tokens=4))
    assert seen == [3] and fake.threads == 3  # the tiny model: far under ALL_CORES_ABOVE
    assert [len(c.tokens) > 0 for c in out[0]] == [True, True]


@pytest.mark.parametrize("big, inside", [(True, 4), (False, 2)])
def test_only_a_model_larger_than_the_caches_decodes_on_every_core(fake_openblas, big, inside):
    fake = fake_openblas(2, 4)
    with fast_blas.decoding_threads(fast_blas.ALL_CORES_ABOVE * (2 if big else 0.5)):
        assert fake.threads == inside
    assert fake.threads == 2


THREADS_PROBE = r"""
import ctypes, json
import numpy as np
import mlx.core as mx
from mlx_xpo_plugin.cpu import fast_blas
lib = ctypes.CDLL(fast_blas.STATE["loaded"])
prefix = fast_blas.STATE["prefix"]
get = getattr(lib, prefix + "openblas_get_num_threads")
before = get()
a = np.random.default_rng(0).standard_normal((4, 256), dtype=np.float32)
b = np.random.default_rng(1).standard_normal((256, 768), dtype=np.float32)
with fast_blas.decoding_threads():
    inside = get()
    err = float(np.abs(np.array(mx.array(a) @ mx.array(b)) - a @ b).max())
print(json.dumps({"before": before, "inside": inside, "after": get(), "phases": fast_blas.PHASE_THREADS,
                  "cores": fast_blas.usable_cores(), "max_abs_err": err}))
"""


@linux_cpu
@pytest.mark.skipif(SYSTEM_LIB is None and PIP_LIB is None, reason="no OpenBLAS on this machine")
@pytest.mark.parametrize("threads", ["2", "1"])
def test_the_real_openblas_decodes_on_the_idle_cores(threads):
    e = {k: v for k, v in os.environ.items() if k not in ("MLX_XPO_BLAS", "MLX_XPO_PLUGIN")}
    e["MLX_XPO_BLAS_SCOPE"] = "all"
    r = subprocess.run(
        [sys.executable, "-c", THREADS_PROBE],
        capture_output=True,
        text=True,
        env={**e, "OPENBLAS_NUM_THREADS": threads},
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    # each count is cut to the cores other processes leave idle (the machine may be busy now)
    assert out["before"] == int(threads)
    assert out["phases"] == {"decoding": out["inside"], "scoring": out["after"]}
    assert 1 <= out["inside"] <= min(int(threads), out["cores"])  # the user set the count here
    assert 1 <= out["after"] <= int(threads)
    assert out["max_abs_err"] < 1e-3


class FakeLib:
    """A loaded library with a prefixed OpenBLAS thread API (ctypes functions get restype/argtypes)."""

    class Fn:
        def __init__(self, f):
            self.f = f

        def __call__(self, *a):
            return self.f(*a)

    def __init__(self, threads, prefix="scipy_"):
        self.threads = threads
        setattr(self, prefix + "openblas_get_num_threads", self.Fn(lambda: self.threads))
        setattr(self, prefix + "openblas_set_num_threads", self.Fn(lambda n: setattr(self, "threads", n)))


@pytest.mark.parametrize(
    "threads, cores, env, after",
    [
        (2, 2, {}, 2),
        (16, 8, {}, 8),
        (4, 16, {}, 4),
        (1, 1, {}, 1),
        (2, 2, {"OPENBLAS_NUM_THREADS": "2"}, 2),  # the user's count wins
        (2, 2, {"OMP_NUM_THREADS": "2"}, 2),
    ],
)
def test_the_pip_openblas_runs_on_the_usable_cores_unless_the_user_set_its_threads(
    monkeypatch, threads, cores, env, after
):
    monkeypatch.setattr(fast_blas, "usable_cores", lambda: cores)
    lib = FakeLib(threads)
    got = fast_blas.all_cores(lib, "scipy_", env)
    assert lib.threads == after and got == (None if env else after)


def test_a_library_without_the_prefixed_thread_api_is_left_alone():
    assert fast_blas.all_cores(FakeLib(4, prefix=""), "scipy_", {}) is None

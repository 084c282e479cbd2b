"""Notes a run prints: compiling kernels on a first run (so that a long step 1 does not look
hung), and a judge_system that the chosen judge ignores."""

import mlx.core as mx

from mlx_xpo_plugin.commands import hints


def test_the_kernel_cache_follows_the_temp_directory_as_cpp_finds_it():
    assert hints.kernel_cache({}, "1.2.3") == "/tmp/mlx/1.2.3/cpu"
    assert hints.kernel_cache({"TMP": "/b", "TMPDIR": "/a"}, "1.2.3") == "/a/mlx/1.2.3/cpu"
    assert hints.kernel_cache({"TEMP": "/c"}, "1.2.3") == "/c/mlx/1.2.3/cpu"


def test_an_empty_or_missing_kernel_cache_is_said(tmp_path):
    env = {"TMPDIR": str(tmp_path)}
    note = hints.kernel_note(mx.cpu, env, "9.9")
    assert note.startswith("compiling kernels (once;") and str(tmp_path / "mlx" / "9.9" / "cpu") in note
    d = tmp_path / "mlx" / "9.9" / "cpu"
    d.mkdir(parents=True)
    (d / "kernel.cpp").write_text("// a source file alone is not a compiled kernel")
    assert hints.kernel_note(mx.cpu, env, "9.9") is not None
    (d / "libkernel_contiguous.so").write_bytes(b"")
    assert hints.kernel_note(mx.cpu, env, "9.9") is None


def test_nothing_is_said_off_the_cpu(tmp_path):
    assert hints.kernel_note(mx.gpu, {"TMPDIR": str(tmp_path)}, "9.9") is None


def test_a_judge_system_the_judge_ignores_is_noted():
    from mlx_xpo_plugin.judges.builtin import BUILTIN_JUDGE_FACTORIES

    kinds = {f.name: f for f in BUILTIN_JUDGE_FACTORIES}
    note = hints.ignored_judge_system("Prefer polite answers.", kinds["function"])
    assert note.startswith("note: judge_system is set, but the function judge ignores it") and "\n" not in note
    assert hints.ignored_judge_system("Prefer polite answers.", kinds["human"]) is not None
    assert hints.ignored_judge_system("Prefer polite answers.", kinds["llm"]) is None
    assert hints.ignored_judge_system("Prefer polite answers.", kinds["http"]) is None
    assert hints.ignored_judge_system(None, kinds["function"]) is None


def test_the_verbose_setting():
    import pytest

    from mlx_xpo_plugin.errors import ConfigError

    assert hints.verbose({}) is False and hints.verbose({"MLX_XPO_VERBOSE": "0"}) is False
    assert hints.verbose({"MLX_XPO_VERBOSE": "1"}) is True and hints.verbose({"MLX_XPO_VERBOSE": " Yes "}) is True
    with pytest.raises(ConfigError) as e:
        hints.verbose({"MLX_XPO_VERBOSE": "loud"})
    assert str(e.value) == "MLX_XPO_VERBOSE: 'loud' is not valid; use 1 (detail lines too) or 0 (the default)"

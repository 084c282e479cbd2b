"""Adapters, checkpoints and JSON outputs get the mode every other output of a run gets (what
``open(path, "w")`` gives: 0666 less the umask), not the 0600 of their temporary file."""

import os
import stat

import mlx.core as mx
import pytest

from mlx_xpo_plugin.loop import atomic as ckpt


@pytest.fixture(params=[0o022, 0o002, 0o077])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_saves_get_the_mode_of_a_plain_new_file(tmp_path, umask):
    with open(tmp_path / "plain.txt", "w") as f:
        f.write("x")
    ckpt.save_json(str(tmp_path / "state.json"), {"step": 1})
    ckpt.save_arrays(str(tmp_path / "adapters.safetensors"), {"w": mx.zeros((2,))})
    assert mode(tmp_path / "state.json") == mode(tmp_path / "plain.txt") == 0o666 & ~umask
    assert mode(tmp_path / "adapters.safetensors") == 0o666 & ~umask
    assert os.umask(umask) == umask  # new_file_mode() left the umask as it was


def test_replacing_a_file_keeps_the_new_files_mode(tmp_path, umask):
    target = tmp_path / "adapters.safetensors"
    target.write_bytes(b"old")
    os.chmod(target, 0o600)
    ckpt.save_arrays(str(target), {"w": mx.ones((1,))})
    assert mode(target) == 0o666 & ~umask

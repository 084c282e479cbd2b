"""The wired limit, as upstream sets it on Metal: with the device's report replaced in the test."""

from types import SimpleNamespace

import mlx.core as mx
import pytest

from mlx_xpo_plugin.commands import runner
from mlx_xpo_plugin.compute import device

METAL_REPORT = {
    "architecture": "applegpu_g15s",
    "device_name": "Apple M3 Max",
    "memory_size": 64 * 2**30,
    "max_recommended_working_set_size": 48 * 2**30,
    "max_buffer_length": 32 * 2**30,
}


class FakeDevice:
    """mx.device_info and mx.set_wired_limit of a device that reports ``report``."""

    def __init__(self, monkeypatch, report):
        self.limit, self.calls = 0, []
        monkeypatch.setattr(mx, "device_info", lambda: dict(report))
        monkeypatch.setattr(mx, "set_wired_limit", self.set_wired_limit)

    def set_wired_limit(self, size):
        self.calls.append(size)
        previous, self.limit = self.limit, size
        return previous


def test_a_metal_device_gets_its_recommended_working_set_wired_then_the_old_limit_back(monkeypatch):
    dev = FakeDevice(monkeypatch, METAL_REPORT)
    dev.limit = 5 * 2**30  # a limit set before the run
    with device.wired_limit():
        assert dev.limit == METAL_REPORT["max_recommended_working_set_size"]
    assert dev.calls == [48 * 2**30, 5 * 2**30] and dev.limit == 5 * 2**30


def test_the_old_limit_comes_back_after_an_error(monkeypatch):
    dev = FakeDevice(monkeypatch, METAL_REPORT)
    with pytest.raises(KeyError), device.wired_limit():
        raise KeyError("boom")
    assert dev.calls == [48 * 2**30, 0] and dev.limit == 0


def test_a_device_without_the_report_is_left_alone(monkeypatch):
    dev = FakeDevice(monkeypatch, {"architecture": "x86_64", "device_name": "AMD EPYC"})
    with device.wired_limit():
        pass
    assert dev.calls == [] and device.recommended_working_set() is None


def test_this_cpu_reports_no_recommended_working_set():
    if mx.default_device() != mx.cpu:
        pytest.skip("a GPU backend: its report is its own")
    assert device.recommended_working_set() is None
    with device.wired_limit():  # the call upstream's trainers make would raise KeyError here
        pass


def test_a_run_holds_the_limit_from_loading_the_models_to_its_end(monkeypatch):
    dev = FakeDevice(monkeypatch, METAL_REPORT)
    seen = []

    def load_models(cfg):
        seen.append(dev.limit)
        raise RuntimeError("stop after loading")

    monkeypatch.setattr(runner, "announce", lambda cfg: None)
    monkeypatch.setattr(runner, "load_models", load_models)
    with pytest.raises(RuntimeError, match="stop after loading"):
        runner._run(SimpleNamespace(seed=0, train=False), None, None, False)
    assert seen == [48 * 2**30]
    assert dev.calls == [48 * 2**30, 0]

"""pyproject.toml: what a build and an install need, checked where a wrong bound would only show on
another machine (an older setuptools without build isolation, a platform without the BLAS wheel)."""

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
PYPROJECT = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())


def lower_bound(requirements, name):
    for req in requirements:
        m = re.match(rf"{re.escape(name)}\s*>=\s*([0-9]+)", req)
        if m:
            return int(m.group(1))
    return None


def test_the_build_asks_for_a_setuptools_that_reads_the_license_form_used():
    bound = lower_bound(PYPROJECT["build-system"]["requires"], "setuptools")
    assert bound is not None
    if isinstance(PYPROJECT["project"].get("license"), str):  # an SPDX expression (PEP 639)
        assert bound >= 77, f"license = {PYPROJECT['project']['license']!r} needs setuptools >= 77, not >= {bound}"


def test_the_fast_blas_wheel_is_a_linux_only_dependency():
    deps = [d for d in PYPROJECT["project"]["dependencies"] if d.startswith("scipy-openblas32")]
    assert len(deps) == 1
    marker = deps[0].split(";", 1)[1]
    assert "sys_platform == 'linux'" in marker  # never on macOS (Accelerate/Metal) or Windows
    assert "x86_64" in marker and "aarch64" in marker  # the platforms it has wheels for


def test_the_upstream_range_is_the_one_checked_and_announced():
    """pyproject.toml's mlx-lm-lora range = the start-up check's message = the oldest release
    `make compat` installs; the upper bound lets the next minor releases in (<6)."""
    from mlx_xpo_plugin.host.activation import SUPPORTED
    from tests.test_compat import SUPPORTED_RELEASES

    (req,) = [d.split("#")[0].strip() for d in PYPROJECT["project"]["dependencies"] if d.startswith("mlx-lm-lora")]
    assert req.replace(" ", "") == SUPPORTED
    lower = re.search(r">=([0-9.]+)", req).group(1)
    assert lower == SUPPORTED_RELEASES[0] and ",<6" in req


def test_mlx_lm_range_admits_what_every_supported_upstream_release_needs():
    """Every supported mlx-lm-lora release needs mlx_lm>=0.32.0; ours must allow it."""
    (req,) = [d for d in PYPROJECT["project"]["dependencies"] if d.startswith("mlx-lm>")]
    lo = tuple(int(x) for x in re.search(r">=([0-9.]+)", req).group(1).split("."))
    hi = tuple(int(x) for x in re.search(r"<([0-9.]+)", req).group(1).split("."))
    assert lo <= (0, 32, 0) < hi


def test_the_lower_bounds_are_what_every_supported_upstream_release_needs():
    """Every supported mlx-lm-lora release (5.8.6 to 5.10.2, by their metadata) needs Python 3.11,
    mlx>=0.32.3 and mlx_lm>=0.32.0: a lower bound below that could never install with one of them;
    ruff checks the code for the same Python. `make compat` installs exactly the lowest set."""
    project = PYPROJECT["project"]
    assert project["requires-python"] == ">=3.11"
    assert PYPROJECT["tool"]["ruff"]["target-version"] == "py311"
    lows = {}
    for dep in project["dependencies"]:
        name, low = re.match(r"([a-z0-9-]+)(?:\[[a-z]+\])?>=([0-9.]+)", dep).groups()
        lows.setdefault(name, set()).add(low)
    assert lows["mlx"] == {"0.32.3"} and lows["mlx-lm"] == {"0.32.0"} and lows["mlx-lm-lora"] == {"5.8.6"}

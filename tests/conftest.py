"""Shared fixtures: one tiny random model + BPE tokenizer and a prompt dataset, built offline
once per test session (cached under .cache/ in the repo between sessions)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# No test reaches a model hub. huggingface_hub reads these when it is first imported, so they are
# set before anything imports it, and the commands the tests start inherit them: a hub id not in
# the cache fails at once. tests/test_hub.py serves its own hub on 127.0.0.1 to the commands it starts.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"  # the discard port: nothing listens there

from mlx_xpo_plugin.commands.tiny import build_tiny_model, write_prompt_dataset
from mlx_xpo_plugin.cpu import fast_blas

# The tests in this process run on MLX as shipped (on Linux CPUs the bundled reference BLAS), as they
# did before a fast BLAS went under this project's commands, whatever module imports mlx.core first:
# the learning tests' thresholds were set on those numerics. Tests that start a command in a
# subprocess get the fast BLAS as a user does (test_fast_blas checks the choice itself).
fast_blas.STATE.update(
    blas="as shipped with mlx", loaded=None, prefix="", why="the test session keeps MLX as shipped (tests/conftest.py)"
)

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("MLX_XPO_TEST_CACHE", REPO / ".cache" / "test-models"))


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    """Path of a tiny qwen2 model (hidden 64, 2 layers, vocab 512) loadable by mlx_lm.load."""
    return str(build_tiny_model(CACHE / "tiny", preset="tiny", seed=0))


@pytest.fixture(scope="session")
def tiny_model(tiny_model_path):
    """(model, tokenizer) loaded once; tests must not train this shared instance."""
    from mlx_lm import load

    return load(tiny_model_path)


@pytest.fixture(scope="session")
def prompt_data_dir(tmp_path_factory) -> str:
    """A folder with train/valid/test.jsonl prompt-only files."""
    return str(write_prompt_dataset(tmp_path_factory.mktemp("data")))


class RuleJudge:
    """Prefers the completion with more 'e' characters; equal counts tie. Deterministic."""

    def __init__(self, letter: str = "e"):
        self.letter = letter
        self.calls = 0

    def judge(self, prompts, pairs):
        from mlx_xpo_plugin.contracts import Verdict

        self.calls += 1
        out = []
        for a, b in pairs:
            ca, cb = a.count(self.letter), b.count(self.letter)
            out.append(Verdict.tied() if ca == cb else Verdict(0 if ca > cb else 1))
        return out


@pytest.fixture
def lora_model(tiny_model_path, tmp_path):
    """A fresh LoRA-wrapped tiny model (trainable), its tokenizer and an adapter folder."""
    import mlx.core as mx
    from mlx_lm_lora.utils import from_pretrained

    mx.random.seed(0)
    model, tok, _ = from_pretrained(
        tiny_model_path,
        new_adapter_path=str(tmp_path / "ad"),
        lora_config={"rank": 8, "dropout": 0.0, "scale": 10.0, "use_dora": False, "num_layers": -1},
    )
    return model, tok, str(tmp_path / "ad")

"""In-process training on the tiny random model, shared by bench_learning.py and
bench_exploration.py: the model with LoRA adapters, a letter-counting rule judge, and the trainer
(nothing saved, no progress bar)."""

from __future__ import annotations

import mlx.core as mx
import mlx.optimizers as optim

from mlx_xpo_plugin.compute.reference import Reference
from mlx_xpo_plugin.contracts import Verdict
from mlx_xpo_plugin.loop.settings import LoopSettings
from mlx_xpo_plugin.loop.trainer import OnlineTrainer
from mlx_xpo_plugin.online_dpo_trainer import OnlineDPO
from mlx_xpo_plugin.xpo_trainer import XPO

LORA = {"rank": 8, "dropout": 0.0, "scale": 10.0, "use_dora": False, "num_layers": -1}
LEARNING_RATE = 3e-3  # Adam; suits this 64-wide random model only


class LetterJudge:
    """More of ``letter`` wins; equal counts tie (``letter="e"`` is mlx_xpo_plugin.rules:prefer_letter_e)."""

    def __init__(self, letter: str = "e"):
        self.letter = letter

    def judge(self, prompts, pairs):
        out = []
        for a, b in pairs:
            ca, cb = a.count(self.letter), b.count(self.letter)
            out.append(Verdict.tied() if ca == cb else Verdict(0 if ca > cb else 1))
        return out


def load(path: str, seed: int):
    """(model with fresh LoRA adapters, tokenizer); the adapters' initial values follow ``seed``."""
    from mlx_lm_lora.utils import from_pretrained

    mx.random.seed(seed)
    model, tok, _ = from_pretrained(path, lora_config=LORA)
    return model, tok


def trainer(model, tok, train, mode: str, letter: str, ad: str, **loop):
    """An OnlineTrainer of ``mode`` with the letter judge, saving nothing; ``loop``: the
    LoopSettings (iters, batch_size, seed, steps_per_report, steps_per_eval, max_completion_length,
    temperature, and for xpo alpha, xpo_bonus)."""
    s = LoopSettings(adapter_path=ad, progress=False, save_every=10**9, **loop)
    method = (OnlineDPO if mode == "online_dpo" else XPO)(s)
    opt = optim.Adam(learning_rate=LEARNING_RATE)
    t = OnlineTrainer(
        s, method, model, tok, Reference(model), LetterJudge(letter), opt, train, None, log=lambda m: None
    )
    t.save = lambda final=False: None
    return t

"""Tiny, offline, random-weight models for the demo, the tests and the benchmarks.

Nothing is fetched from a model hub: the tokenizer is a byte-level BPE trained with
`tokenizers` on the embedded prompt set, and the model is one of mlx-lm's own classes
(qwen2) with seeded random weights, saved in the layout `mlx_lm.load` reads.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

PRESETS = {
    # hidden, layers, heads, kv_heads, intermediate, vocab
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=512,
    ),
    "small": dict(
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=768,
        vocab_size=2048,
    ),
    # the shapes of Qwen2.5-0.5B(-Instruct) and Qwen2.5-1.5B, with random weights
    "q05": dict(
        hidden_size=896,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        intermediate_size=4864,
        vocab_size=151936,
        rope_theta=1000000.0,
        max_position_embeddings=32768,
    ),
    "q15": dict(
        hidden_size=1536,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        intermediate_size=8960,
        vocab_size=151936,
        rope_theta=1000000.0,
        max_position_embeddings=32768,
    ),
}
#: The tokenizer's vocabulary is at most this (a BPE trained on the embedded prompts cannot reach
#: a real model's 151,936 entries); the model's vocabulary may be larger, as Qwen's is.
TOKENIZER_VOCAB_MAX = 2048
STORAGE = ("float32", "bfloat16", "float16")

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_TOPICS = [
    "the sea",
    "a red fox",
    "winter mornings",
    "old bridges",
    "coffee",
    "the moon",
    "city parks",
    "rain on glass",
    "a small boat",
    "mountain paths",
    "bread",
    "a quiet library",
    "summer storms",
    "paper kites",
    "the river",
    "a lighthouse",
    "green tea",
    "autumn leaves",
    "the desert",
    "a train station",
    "honey bees",
    "a garden",
    "snow",
    "the market",
    "a violin",
    "clocks",
    "a forest",
    "sand",
]
_FORMS = [
    "Write a short note about {t}.",
    "Say something cheerful about {t}!",
    "Describe {t} in one line.",
    "What do you like about {t}?",
    "Tell me a fact about {t}.",
    "Give a happy greeting about {t}!",
]


def embedded_prompts() -> list[str]:
    """The demo prompt set: every form applied to every topic (168 prompts), in a fixed order."""
    return [f.format(t=t) for t in _TOPICS for f in _FORMS]


def write_prompt_dataset(directory: Path, seed: int = 0, n_valid: int = 24, n_test: int = 24) -> Path:
    """Write train/valid/test.jsonl prompt-only files (standard format) into `directory`."""
    prompts = embedded_prompts()
    random.Random(seed).shuffle(prompts)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    splits = {
        "valid": prompts[:n_valid],
        "test": prompts[n_valid : n_valid + n_test],
        "train": prompts[n_valid + n_test :],
    }
    for name, rows in splits.items():
        with open(directory / f"{name}.jsonl", "w") as f:
            for p in rows:
                f.write(json.dumps({"prompt": p}) + "\n")
    return directory


@dataclass(frozen=True)
class TinySpec:
    preset: str = "tiny"
    seed: int = 0


def _train_tokenizer(vocab_size: int, out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = embedded_prompts() * 4 + [
        "Yes! Sure! What a lovely day! I like it a lot.",
        "The answer is simple: it is good, and it is kind.",
    ]
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))


def build_tiny_model(
    out: str | os.PathLike,
    preset: str = "tiny",
    seed: int = 0,
    dtype: str = "float32",
    bits: int | None = None,
    group_size: int = 64,
) -> Path:
    """Create (or reuse) a random qwen2 model + BPE tokenizer at `out`; returns the path.

    The weights are drawn in float32 (seeded), then stored as ``dtype``; with ``bits`` every
    Linear and Embedding is quantized (affine, ``group_size``) as mlx-lm's converter does, and
    config.json gets the ``quantization`` entry ``mlx_lm.load`` reads. The folder is complete once
    `config.json` exists (written last), so an interrupted build is redone rather than half-used.
    """
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_map
    from mlx_lm.models import qwen2

    out = Path(out)
    if (out / "config.json").exists():
        return out
    if preset not in PRESETS:
        raise ValueError(f"preset: {preset!r} is not one of {sorted(PRESETS)}")
    if dtype not in STORAGE:
        raise ValueError(f"dtype: {dtype!r} is not one of {', '.join(STORAGE)}")
    out.mkdir(parents=True, exist_ok=True)
    p = PRESETS[preset]
    _train_tokenizer(min(p["vocab_size"], TOKENIZER_VOCAB_MAX), out)
    config = dict(
        model_type="qwen2",
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    config.update(p)
    mx.random.seed(seed)
    model = qwen2.Model(qwen2.ModelArgs.from_dict(config))
    if dtype != "float32":
        model.update(tree_map(lambda a: a.astype(getattr(mx, dtype)), model.parameters()))
    if bits:
        nn.quantize(model, group_size=group_size, bits=bits)
        config["quantization"] = {"group_size": group_size, "bits": bits}
    if dtype != "float32":
        config["torch_dtype"] = dtype
    mx.eval(model.parameters())
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    tmp = out / "config.json.tmp"
    tmp.write_text(json.dumps(config, indent=2))
    os.replace(tmp, out / "config.json")
    return out


def default_cache_dir() -> Path:
    base = os.environ.get("MLX_XPO_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "mlx-xpo-plugin"
    )
    return Path(base)

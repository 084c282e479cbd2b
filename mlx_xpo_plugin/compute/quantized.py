"""Whether a model is already quantized: read from the model folder (before loading) and from the
loaded model itself (the source of truth), never from the ``load_in_*`` settings alone.

Full fine-tuning of a quantized model would train only what is not quantized (norms and biases:
576 of the tiny model's 107,072 values) while calling the result ``full``; LoRA and DoRA train
adapters on top of the frozen quantized weights and work.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from mlx_xpo_plugin.errors import ConfigError


def folder_quantization(folder: str) -> Optional[str]:
    """A description such as '4-bit affine, group size 64' when ``folder/config.json`` declares a
    quantization (mlx-lm's ``quantization`` or Hugging Face's ``quantization_config``), else None."""
    try:
        with open(os.path.join(folder, "config.json")) as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return None
    q = cfg.get("quantization") or cfg.get("quantization_config") if isinstance(cfg, dict) else None
    if not q:
        return None
    if not isinstance(q, dict):
        return "quantized"
    bits = q.get("bits")
    parts = [f"{bits}-bit" if bits else "quantized", str(q.get("mode") or q.get("quant_method") or "")]
    text = " ".join(p for p in parts if p)
    return text + (f", group size {q['group_size']}" if q.get("group_size") else "")


def quantized_layers(model) -> list[str]:
    """Names of the loaded model's quantized modules (QuantizedLinear, QuantizedEmbedding, ...:
    any module holding quantization ``scales``)."""
    return sorted(
        name
        for name, m in model.named_modules()
        if "Quantized" in type(m).__name__ or ("scales" in m and "weight" in m)
    )


def refuse_full(model_name: str, what: str) -> ConfigError:
    return ConfigError(
        "train_type",
        "full",
        f"the model {model_name!r} is already quantized "
        f"({what}): full fine-tuning would train only its unquantized norms and "
        "biases",
        "use train_type lora or dora, which train adapters on top of the quantized weights",
    )

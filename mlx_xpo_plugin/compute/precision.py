"""The precision the frozen base weights compute in: the ``compute_dtype`` setting.

MLX's CPU backend sends float32 matrix products to BLAS (sgemm); bfloat16 and float16 products
and ``quantized_matmul`` run on its own, much slower kernels. So on the CPU, ``auto`` converts the
base once at load:

* every floating-point base weight (not the LoRA/DoRA adapter arrays) is cast to float32;
* every quantized layer (``QuantizedLinear``, ``QuantizedEmbedding``) becomes a plain ``Linear`` /
  ``Embedding`` holding ``W = mx.dequantize(Wq, scales, biases, group_size, bits, mode)``, i.e.
  per group g of ``group_size`` weights ``W = scale_g * q + bias_g`` (affine), exactly the matrix
  ``quantized_matmul`` multiplies by. Adapters trained on it are adapters of the quantized
  checkpoint: ``mlx_lm.load(original, adapter_path=...)`` gives the same model, up to the
  rounding of the activations' dtype.

The converted layers keep their frozen/trainable state (quantized weights are always frozen) and
``nn.Linear``'s [out, in] layout, which the few-row kernel decoding runs on reads as stored
(mlx_xpo_plugin/cpu/skinny.c).

``auto`` converts only when the bytes the conversion adds, ``sum(numel * 4) - bytes stored now``
over the converted arrays, are at most half of the memory available at that moment
(``MemAvailable`` of /proc/meminfo, else the free physical pages); otherwise it keeps the
checkpoint's precision and says so in one line. On a GPU backend (Metal, CUDA) ``auto`` keeps the
checkpoint's precision. ``float32`` / ``bfloat16`` / ``float16`` convert whatever the device and
memory; ``native`` never converts.

:func:`restore_storage` puts the checkpoint's storage back (re-quantizing with the recorded
group size, bits and mode; casting back), so a fused model is saved as the checkpoint was.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

CHOICES = ("auto", "float32", "bfloat16", "float16", "native")
_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def on_cpu_backend() -> bool:
    """Whether MLX computes on its CPU backend (the default device is a CPU)."""
    return mx.default_device().type == mx.DeviceType.cpu


def target_dtype(setting: str) -> Optional[mx.Dtype]:
    """The dtype ``setting`` asks for on this backend, before the memory check (None: keep)."""
    if setting == "native":
        return None
    if setting == "auto":
        return mx.float32 if on_cpu_backend() else None
    return _DTYPES[setting]


def available_memory() -> Optional[int]:
    """Bytes of memory available now: MemAvailable (Linux), else free physical pages, else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _is_adapter(m: nn.Module) -> bool:
    return hasattr(m, "lora_a") and hasattr(m, "lora_b")


def _quantized(m: nn.Module) -> bool:
    return isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))


def _float_keys(m: nn.Module, dtype) -> list[str]:
    """The module's own floating-point arrays that are not already ``dtype``."""
    return [
        k
        for k, v in m.items()
        if not k.startswith("_")
        and isinstance(v, mx.array)
        and mx.issubdtype(v.dtype, mx.floating)
        and v.dtype != dtype
    ]


def _units(model: nn.Module, dtype):
    """(path, module, kind) of every conversion: kind 'dequantize' or 'cast'."""
    out = []
    for name, m in model.named_modules():
        if _is_adapter(m):
            continue
        if _quantized(m):
            out.append((name, m, "dequantize"))
        elif _float_keys(m, dtype):
            out.append((name, m, "cast"))
    return out


def conversion_bytes(model: nn.Module, dtype) -> tuple[int, int]:
    """(bytes stored now, bytes after conversion) of the arrays the conversion touches."""
    size = dtype.size
    before = after = 0
    for _, m, kind in _units(model, dtype):
        if kind == "dequantize":
            before += sum(v.nbytes for k, v in m.items() if isinstance(v, mx.array))
            rows, cols = m["weight"].shape
            after += rows * (cols * 32 // m.bits) * size
            if "bias" in m:
                after += m["bias"].size * size
        else:
            for k in _float_keys(m, dtype):
                before += m[k].nbytes
                after += m[k].size * size
    return before, after


@dataclass
class Conversion:
    """What :func:`apply` changed: enough to put the checkpoint's storage back."""

    dtype: Optional[mx.Dtype] = None  # None: nothing converted
    quantized: dict = field(default_factory=dict)  # path -> (group_size, bits, mode, scales dtype)
    originals: dict = field(default_factory=dict)  # path -> the quantized layer (keep_original)
    cast: dict = field(default_factory=dict)  # path -> {key: original dtype}
    line: str = ""

    @property
    def converted(self) -> bool:
        return self.dtype is not None and bool(self.quantized or self.cast)


def _dequantized(m: nn.Module, dtype) -> nn.Module:
    """The plain layer of a quantized one. Float scales and biases are cast to ``dtype`` first, so
    ``scale * q + bias`` is evaluated in ``dtype`` as ``quantized_matmul`` evaluates it for
    ``dtype`` activations (dequantizing in the scales' bfloat16 would round it)."""
    scales, biases = m["scales"], m.get("biases")
    if mx.issubdtype(scales.dtype, mx.floating):
        scales = scales.astype(dtype)
        biases = None if biases is None else biases.astype(dtype)
    w = mx.dequantize(m["weight"], scales, biases, group_size=m.group_size, bits=m.bits, mode=m.mode, dtype=dtype)
    frozen_bias = "bias" in m and "bias" not in dict(_local_trainable(m))
    if isinstance(m, nn.QuantizedEmbedding):
        new = nn.Embedding(*w.shape)
        new.weight = w
    else:
        new = nn.Linear(w.shape[1], w.shape[0], bias="bias" in m)
        new.weight = w
        if "bias" in m:
            new.bias = m["bias"].astype(dtype)
    new.freeze(keys=["weight"] + (["bias"] if frozen_bias else []), recurse=False)
    return new


def _local_trainable(m: nn.Module):
    return [(k, v) for k, v in m.trainable_parameters().items() if isinstance(v, mx.array)]


def _describe(model: nn.Module) -> str:
    kinds = sorted({f"{m.bits}-bit" for _, m in model.named_modules() if _quantized(m)})
    floats = sorted(
        {
            str(v.dtype).replace("mlx.core.", "")
            for _, m in model.named_modules()
            if not _is_adapter(m)
            for k, v in m.items()
            if isinstance(v, mx.array) and not k.startswith("_") and mx.issubdtype(v.dtype, mx.floating)
        }
    )
    return " + ".join(kinds + floats) or "no floating weights"


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def apply(model: nn.Module, setting: str, what: str = "model", log=print, keep_original: bool = False) -> Conversion:
    """Convert ``model``'s base weights as ``setting`` says (see the module docstring); prints one
    line saying what was done (or why not) and returns the :class:`Conversion`. With
    ``keep_original`` the quantized layers are kept too (their packed bytes), so that
    :func:`restore_storage` puts back exactly the checkpoint's layers (for fusing)."""
    dtype = target_dtype(setting)
    if dtype is None:
        conv = Conversion(
            line=f"compute_dtype: {setting}: {what} computes in its stored precision ({_describe(model)})"
        )
        log(conv.line)
        return conv
    before, after = conversion_bytes(model, dtype)
    stored, dst = _describe(model), str(dtype).replace("mlx.core.", "")
    if after == 0:
        return Conversion(dtype, line="")
    if setting == "auto":
        avail = available_memory()
        if avail is not None and after - before > avail / 2:
            conv = Conversion(
                line=(
                    f"compute_dtype: auto keeps the {what}'s {stored} weights: {dst} needs "
                    f"{_size(after - before)} more, over half of the {_size(avail)} "
                    f"available (compute_dtype: float32 forces it)"
                )
            )
            log(conv.line)
            return conv
    conv = Conversion(dtype)
    for path, m, kind in _units(model, dtype):
        if kind == "dequantize":
            conv.quantized[path] = (m.group_size, m.bits, m.mode, m["scales"].dtype)
            if keep_original:
                conv.originals[path] = m
            new = _dequantized(m, dtype)
            mx.eval(new.parameters())
            model.update_modules(tree_unflatten([(path, new)]))
        else:
            keys = _float_keys(m, dtype)
            conv.cast[path] = {k: m[k].dtype for k in keys}
            for k in keys:
                m[k] = m[k].astype(dtype)
            mx.eval([m[k] for k in keys])
    where = "the CPU backend" if on_cpu_backend() else "this device"
    conv.line = (
        f"compute_dtype: {setting}: {what} weights {stored} -> {dst} on {where} ({_size(before)} -> {_size(after)})"
    )
    log(conv.line)
    return conv


def restore_storage(model: nn.Module, conv: Conversion) -> None:
    """Put back the checkpoint's storage of what :func:`apply` converted (before saving a fused
    model): the kept quantized layers themselves (else the layer quantized again with its recorded
    group size, bits and mode, which can round differently), cast arrays cast back."""
    modules = dict(model.named_modules())
    for path, dtypes in conv.cast.items():
        m = modules.get(path)
        for k, dt in dtypes.items():
            if m is not None and isinstance(m.get(k), mx.array):
                m[k] = mx.contiguous(m[k].astype(dt))  # row-major again, as the checkpoint stored it
    new = []
    for path, (group_size, bits, mode, scales_dtype) in conv.quantized.items():
        m = modules.get(path)
        if path in conv.originals:
            new.append((path, conv.originals[path]))
        elif isinstance(m, (nn.Linear, nn.Embedding)):
            m.weight = mx.contiguous(m.weight.astype(scales_dtype))
            if "bias" in m:
                m.bias = m.bias.astype(scales_dtype)
            new.append((path, m.to_quantized(group_size=group_size, bits=bits, mode=mode)))
    if new:
        model.update_modules(tree_unflatten(new))


def load(path: str, setting: str, what: str = "model"):
    """``mlx_lm.load(path)``, then :func:`apply` with ``setting``: (model, tokenizer)."""
    from mlx_lm import load as mlx_load  # mlx_lm's loader pulls in transformers: only when loading

    model, tokenizer = mlx_load(path)
    apply(model, setting, what)
    return model, tokenizer

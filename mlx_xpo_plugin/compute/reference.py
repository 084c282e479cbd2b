"""The frozen reference policy.

With LoRA or DoRA and no ``reference_model_path``, the reference is the policy's own base
weights with every adapter layer switched off: no second copy of the weights. Otherwise it is a
separately loaded, frozen model.

With LoRA adapters, one batch can hold rows of both policies (:meth:`Reference.rows_split`):
the xpo ``paper`` form samples its policy and its reference completions in one batch that way.
"""

from __future__ import annotations

import contextlib

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten
from mlx_lm.tuner.lora import LoRALinear


def _adapter_bases(model: nn.Module):
    """(path, adapter module, wrapped base module) for every LoRA/DoRA layer of `model`."""
    out = []
    for name, m in model.named_modules():
        if hasattr(m, "lora_a") and hasattr(m, "lora_b"):
            base = getattr(m, "linear", None) or getattr(m, "embedding", None)
            if base is not None:
                out.append((name, m, base))
    return out


@contextlib.contextmanager
def adapters_off(model: nn.Module):
    """Temporarily replace each adapter layer by the base layer it wraps (exactly the base model,
    for LoRA and DoRA alike), restoring the adapters on exit."""
    layers = _adapter_bases(model)
    if not layers:
        yield model
        return
    model.update_modules(tree_unflatten([(n, base) for n, _, base in layers]))
    try:
        yield model
    finally:
        model.update_modules(tree_unflatten([(n, m) for n, m, _ in layers]))


class RowGatedLoRA(nn.Module):
    """A ``LoRALinear`` whose adapter term is switched per batch row:
    ``y_b = W x_b + g_b * scale * (x_b A) B`` with ``g_b`` = 1 (policy) or 0 (reference), ``gate``
    of shape [B, 1, 1]. A gate of 1 gives exactly the LoRA layer's output, 0 exactly the base
    layer's (``y + 0``)."""

    def __init__(self, lora: LoRALinear, gate: mx.array):
        super().__init__()
        self.lora, self.gate = lora, gate

    def __call__(self, x):
        lora = self.lora
        z = (lora.dropout(x) @ lora.lora_a) @ lora.lora_b
        return lora.linear(x) + (self.gate * (lora.scale * z)).astype(x.dtype)


@contextlib.contextmanager
def _gated_rows(model: nn.Module, layers, n_policy: int, n_reference: int):
    gate = mx.array([1.0] * n_policy + [0.0] * n_reference).reshape(-1, 1, 1)
    model.update_modules(tree_unflatten([(n, RowGatedLoRA(m, gate)) for n, m, _ in layers]))
    try:
        yield model
    finally:
        model.update_modules(tree_unflatten([(n, m) for n, m, _ in layers]))


class Reference:
    """``with ref.use() as m:`` gives a module that computes the reference policy."""

    def __init__(self, policy: nn.Module, separate: nn.Module | None = None):
        self.policy, self.separate = policy, separate
        if separate is None and not _adapter_bases(policy):
            raise ValueError(
                "the reference needs adapters to switch off (LoRA/DoRA) or a separate "
                "model (full fine-tuning or reference_model_path)"
            )

    def rows_split(self, n_policy: int, n_reference: int):
        """A context giving a module that computes the policy on the first ``n_policy`` rows of a
        batch and the reference on the next ``n_reference`` (every row keeps its place in the
        batch; the batch size must stay ``n_policy + n_reference``); None where the reference is
        a separate model or an adapter is not a plain ``LoRALinear`` (DoRA's weight norm cannot
        be switched per row)."""
        layers = [] if self.separate is not None else _adapter_bases(self.policy)
        if not layers or any(type(m) is not LoRALinear for _, m, _ in layers):
            return None
        return _gated_rows(self.policy, layers, n_policy, n_reference)

    @contextlib.contextmanager
    def use(self):
        if self.separate is not None:
            yield self.separate
        else:
            with adapters_off(self.policy) as m:
                yield m


class BaseView:
    """The policy's base model as a plain callable: every call runs with the adapters switched off.

    Lets a judge that names the policy's own model share its weights instead of loading a second
    copy. ``parameters()`` are the frozen base weights (the same arrays every step), ``layers`` and
    ``make_cache`` come from the policy, so KV caches work as for the model itself.
    """

    def __init__(self, policy: nn.Module):
        self.policy = policy

    def __call__(self, *args, **kwargs):
        with adapters_off(self.policy) as m:
            return m(*args, **kwargs)

    def parameters(self):
        with adapters_off(self.policy) as m:
            return m.parameters()

    @property
    def layers(self):
        return self.policy.layers

    def __getattr__(self, name):  # make_cache, args, model_type, ... of the policy
        return getattr(self.policy, name)

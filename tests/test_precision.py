"""compute_dtype: the frozen base computes in float32 on the CPU backend (bfloat16 cast, 4-bit
dequantized), with the same greedy tokens and nearly the same log-probs as the checkpoint's own
precision; adapters trained that way load on the original checkpoint with plain mlx_lm."""

import contextlib
import json

import mlx.core as mx
import mlx.nn as nn
import pytest
from conftest import CACHE
from mlx.utils import tree_flatten

from mlx_xpo_plugin import config as C
from mlx_xpo_plugin.commands.tiny import build_tiny_model
from mlx_xpo_plugin.compute import decode
from mlx_xpo_plugin.compute import precision as P
from mlx_xpo_plugin.compute.scoring import completion_logps, pack
from mlx_xpo_plugin.errors import ConfigError

PROMPTS = ["Write a short note about the sea.", "Describe coffee in one line.", "Tell me a fact about snow."]
# |log p(native) - log p(float32)| per completion token, max and mean (measured: bf16 0.021 / 0.008,
# 4-bit 0.113 / 0.036): the native model rounds its activations to bfloat16, the converted one does not
TOL = {"bf16": (0.06, 0.02), "q4": (0.3, 0.08)}


@pytest.fixture(scope="module")
def bf16_path():
    return str(build_tiny_model(CACHE / "tiny-bf16", dtype="bfloat16"))


@pytest.fixture(scope="module")
def q4_path():
    return str(build_tiny_model(CACHE / "tiny-bf16-q4", dtype="bfloat16", bits=4))


def _load(path):
    from mlx_lm import load

    return load(path)


def _float_dtypes(model):
    return {v.dtype for k, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating)}


@contextlib.contextmanager
def record_matmuls():
    """Records (input dtype, weight dtype) of every Linear and tied-embedding product inside the
    block; any quantized_matmul fails."""
    seen = []
    lin, emb = nn.Linear.__call__, nn.Embedding.as_linear

    def linear(self, x):
        seen.append((x.dtype, self.weight.dtype))
        return lin(self, x)

    def as_linear(self, x):
        seen.append((x.dtype, self.weight.dtype))
        return emb(self, x)

    def no_qmm(*a, **k):
        raise AssertionError("quantized_matmul called after conversion")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nn.Linear, "__call__", linear)
        mp.setattr(nn.Embedding, "as_linear", as_linear)
        mp.setattr(mx, "quantized_matmul", no_qmm)
        yield seen


def test_setting_choices_and_error():
    s = C.SETTINGS["compute_dtype"]
    assert s.choices == P.CHOICES and s.default == "auto"
    with pytest.raises(ConfigError) as e:
        C.check_value(s, "fp32")
    msg = str(e.value)
    assert "compute_dtype" in msg and "fp32" in msg and "float32" in msg and "\n" not in msg


def test_policy_per_backend(monkeypatch):
    assert P.target_dtype("native") is None and P.target_dtype("bfloat16") == mx.bfloat16
    monkeypatch.setattr(P, "on_cpu_backend", lambda: True)
    assert P.target_dtype("auto") == mx.float32
    monkeypatch.setattr(P, "on_cpu_backend", lambda: False)  # Metal / CUDA: the checkpoint's own
    assert P.target_dtype("auto") is None and P.target_dtype("float32") == mx.float32


@pytest.mark.parametrize("kind", ["bf16", "q4"])
def test_auto_computes_in_float32_same_tokens(kind, bf16_path, q4_path, capsys):
    path = bf16_path if kind == "bf16" else q4_path
    native, tok = _load(path)
    conv, _ = _load(path)
    assert mx.bfloat16 in _float_dtypes(native)
    assert any(P._quantized(m) for _, m in native.named_modules()) == (kind == "q4")
    c = P.apply(conv, "auto" if P.on_cpu_backend() else "float32", "policy")
    assert c.converted and "-> float32" in capsys.readouterr().out
    assert _float_dtypes(conv) == {mx.float32}
    assert not any(P._quantized(m) for _, m in conv.named_modules())

    prompts = [tok.encode(p) for p in PROMPTS]
    greedy = lambda logprobs: mx.argmax(logprobs, axis=-1)  # noqa: E731
    theirs = decode.generate(native, prompts, 24, greedy, [])
    with record_matmuls() as seen:
        ours = decode.generate(conv, prompts, 24, greedy, [])
        inputs, targets, mask = pack(prompts, ours)
        a = completion_logps(conv, inputs, targets, mask).tokens
        mx.eval(a)
    # every product of the converted model: float32 activations times float32 weights
    assert len(seen) > 7 * 2 and set(seen) == {(mx.float32, mx.float32)}
    assert ours == theirs
    b = completion_logps(native, inputs, targets, mask).tokens
    diff = mx.abs(a - b)
    assert diff.max().item() < TOL[kind][0] and (diff.sum() / mask.sum()).item() < TOL[kind][1]


def test_dequantized_layer_is_what_quantized_matmul_multiplies_by(q4_path):
    """With float32 activations quantized_matmul evaluates scale * q + bias in float32; the
    converted layer holds exactly that matrix."""
    native, _ = _load(q4_path)
    conv, _ = _load(q4_path)
    P.apply(conv, "float32", "policy")
    q = native.model.layers[0].mlp.up_proj
    lin = conv.model.layers[0].mlp.up_proj
    assert type(q) is nn.QuantizedLinear and type(lin) is nn.Linear
    x = mx.random.normal((5, lin.weight.shape[1]), key=mx.random.key(1))
    ref = mx.quantized_matmul(
        x,
        q.weight,
        q.scales.astype(mx.float32),
        q.biases.astype(mx.float32),
        transpose=True,
        group_size=q.group_size,
        bits=q.bits,
    )
    assert mx.array_equal(lin(x), ref).item()
    # the whole model: the same as the quantized one run with float32 activations
    for _, m in native.named_modules():
        for k in [k for k, v in m.items() if isinstance(v, mx.array) and v.dtype == mx.bfloat16]:
            m[k] = m[k].astype(mx.float32)
    x = mx.array([[5, 9, 14, 3, 30, 7]])
    assert mx.abs(conv(x) - native(x)).max().item() < 1e-4


def test_memory_fallback_and_frozen_state(q4_path, monkeypatch, capsys):
    m, _ = _load(q4_path)
    monkeypatch.setattr(P, "on_cpu_backend", lambda: True)
    monkeypatch.setattr(P, "available_memory", lambda: 2**18)  # 256 KiB: the 0.3 MiB more do not fit
    c = P.apply(m, "auto", "judge")
    out = capsys.readouterr().out.strip()
    assert not c.converted and any(P._quantized(x) for _, x in m.named_modules())
    assert out.count("\n") == 0 and "compute_dtype: auto keeps the judge's 4-bit" in out
    assert "compute_dtype: float32 forces it" in out
    m.unfreeze()  # even a fully trainable model: dequantized weights stay frozen, as quantized ones
    P.apply(m, "float32", "judge")  # explicit: converts whatever the memory
    trainable = {k for k, _ in tree_flatten(m.trainable_parameters())}
    assert not any(k.endswith("proj.weight") or k.endswith("embed_tokens.weight") for k in trainable)
    assert "model.norm.weight" in trainable


def test_native_and_gpu_backend_keep_the_checkpoint(bf16_path, monkeypatch, capsys):
    m, _ = _load(bf16_path)
    assert not P.apply(m, "native", "policy").converted
    monkeypatch.setattr(P, "on_cpu_backend", lambda: False)
    assert not P.apply(m, "auto", "policy").converted
    assert "stored precision (bfloat16)" in capsys.readouterr().out
    assert mx.bfloat16 in _float_dtypes(m)


def test_restore_storage_puts_back_the_checkpoint(q4_path):
    m, _ = _load(q4_path)
    before = {k: v for k, v in tree_flatten(m.parameters())}
    c = P.apply(m, "float32", "policy", keep_original=True)
    P.restore_storage(m, c)
    after = {k: v for k, v in tree_flatten(m.parameters())}
    assert before.keys() == after.keys()
    assert all(before[k].dtype == after[k].dtype and mx.array_equal(before[k], after[k]).item() for k in before)


def test_judge_model_follows_the_policy(bf16_path):
    from mlx_xpo_plugin.contracts import JudgeContext
    from mlx_xpo_plugin.judges.llm import build

    j = build(bf16_path, JudgeContext(compute_dtype="float32"))
    assert _float_dtypes(j.model) == {mx.float32}
    assert mx.bfloat16 in _float_dtypes(build(bf16_path, JudgeContext(compute_dtype="native")).model)


def test_trained_adapters_load_on_the_quantized_checkpoint(q4_path, prompt_data_dir, tmp_path, capsys):
    """A LoRA run on the 4-bit checkpoint (computing in float32, a separate 4-bit reference, fuse):
    its adapters load with mlx_lm.load(original, adapter_path=...) and give the trained model's
    outputs there; the fused model is stored like the checkpoint (bfloat16, not float32)."""
    from mlx_lm import load

    from mlx_xpo_plugin.api import train_method
    from mlx_xpo_plugin.xpo_trainer import XPO

    out = tmp_path / "ad"
    rc = train_method(
        XPO,
        {
            "model": q4_path,
            "data": prompt_data_dir,
            "adapter_path": str(out),
            "judge": "mlx_xpo_plugin.rules:prefer_letter_e",
            "batch_size": 2,
            "iters": 2,
            "steps_per_report": 1,
            "steps_per_eval": 100,
            "val_batches": 1,
            "max_seq_length": 128,
            "max_completion_length": 6,
            "learning_rate": 1e-2,
            "reference_model_path": q4_path,
            "fuse": True,
            "compute_dtype": "float32",
        },
        progress=False,
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "compute_dtype: float32: policy weights 4-bit + bfloat16 -> float32" in text
    assert "compute_dtype: float32: reference weights 4-bit + bfloat16 -> float32" in text
    native, tok = load(q4_path, adapter_path=str(out))
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in native.named_modules())
    wide, _ = load(q4_path, adapter_path=str(out))
    P.apply(wide, "float32", "policy")
    lora_b = [v for k, v in tree_flatten(native.trainable_parameters()) if k.endswith("lora_b")]
    assert lora_b and max(mx.abs(v).max().item() for v in lora_b) > 0  # trained, not the zero init
    x = mx.array([tok.encode(PROMPTS[0])])
    lp = lambda m: m(x) - mx.logsumexp(m(x), axis=-1, keepdims=True)  # noqa: E731
    assert mx.abs(lp(native) - lp(wide)).max().item() < TOL["q4"][0]
    fused = json.loads((out / "fused" / "config.json").read_text())
    weights = mx.load(str(next((out / "fused").glob("*.safetensors"))))
    assert {v.dtype for v in weights.values() if mx.issubdtype(v.dtype, mx.floating)} == {mx.bfloat16}
    assert fused["model_type"] == "qwen2"


def test_converted_weights_keep_the_linear_layout_the_few_row_kernel_reads(bf16_path, q4_path):
    """Every converted Linear / Embedding weight is [out, in] row by row, as nn.Linear stores it: the
    ``x @ W.T`` of a decode step then reaches BLAS as (NoTrans, Trans) with the weight as stored,
    the form the few-row kernel (cpu/skinny.c) takes; restore_storage gives back the checkpoint."""
    import numpy as np

    for path in (bf16_path, q4_path):
        native, _ = _load(path)
        conv, _ = _load(path)
        c = P.apply(conv, "float32", "policy", log=lambda s: None, keep_original=False)
        layers = [(n, m) for n, m in conv.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))]
        assert len(layers) > 7
        for name, m in layers:
            assert m.weight.dtype == mx.float32 and np.asarray(m.weight).flags["C_CONTIGUOUS"], name
        if path == bf16_path:
            emb = dict(native.named_modules())["model.embed_tokens"].weight
            assert mx.array_equal(conv.model.embed_tokens.weight, emb.astype(mx.float32))
            P.restore_storage(conv, c)
            w = conv.model.embed_tokens.weight
            assert w.dtype == mx.bfloat16 and mx.array_equal(w, emb)

"""The MLX model judge (logits and generate modes), the shared answer parser and the order
helpers. Real-model tests use the session's tiny random qwen2."""

from __future__ import annotations

import math
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_xpo_plugin.commands.tiny import embedded_prompts
from mlx_xpo_plugin.contracts import JudgeContext, Verdict
from mlx_xpo_plugin.errors import ConfigError
from mlx_xpo_plugin.host.registry import Registry, build_judge, check_judge
from mlx_xpo_plugin.judges.builtin import BUILTIN_JUDGE_FACTORIES
from mlx_xpo_plugin.judges.common import DEFAULT_RUBRIC, combine_orders, draw_flips, pair_messages, unflip
from mlx_xpo_plugin.judges.llm import LLMJudge, label_token_ids
from mlx_xpo_plugin.judges.parse import parse_answer

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def registry():
    return Registry(judges={f.name: f for f in BUILTIN_JUDGE_FACTORIES})


def make_pairs(n: int, seed: int = 0):
    """Prompts and completion pairs of varied lengths (so that rows need padding)."""
    rng = random.Random(seed)
    ps = embedded_prompts()
    prompts = [ps[(7 * i) % len(ps)] for i in range(n)]
    words = "yes sure what a lovely day i like it a lot the answer is simple good kind".split()
    pairs = []
    for i in range(n):
        a = " ".join(rng.choice(words) for _ in range(rng.randint(1, 25)))
        b = " ".join(rng.choice(words) for _ in range(rng.randint(1, 25)))
        pairs.append((a, b))
    return prompts, pairs


def reference_p_second(model, tok, prompt, first, second, rubric=None):
    """P("1") / (P("0") + P("1")) and the two full-vocabulary log-probs for ONE chat, computed
    unbatched and without any cache, straight from the tokenizer and the model."""
    import mlx.core as mx

    text = tok.apply_chat_template(
        pair_messages(rubric, prompt, first, second), tokenize=False, add_generation_prompt=True
    )
    ids = tok.encode(text)
    logits = model(mx.array([ids]))[0, -1].astype(mx.float32)
    logp = np.array(logits - mx.logsumexp(logits), dtype=np.float64)
    t0, t1 = tok.encode("0", add_special_tokens=False), tok.encode("1", add_special_tokens=False)
    assert len(t0) == 1 and len(t1) == 1
    l0, l1 = logp[t0[0]], logp[t1[0]]
    return math.exp(l1) / (math.exp(l0) + math.exp(l1)), l0, l1


# ---------------------------------------------------------------------------------------------
# parser


@pytest.mark.parametrize(
    "text, label",
    [
        ("0", 0),
        ("1", 1),
        (" 1\n", 1),
        ('"1"', 1),
        ("'0'", 0),
        ("1.", 1),
        ("**1**", 1),
        ("`0`", 0),
        ("Answer: 1", 1),
        ("Answer:1", 1),
        ("Output 0", 0),
        ("The answer is 1.", 1),
        ("answer is 1", 1),
        ("Response 1 is better", 1),
        ("I choose 0", 0),
        ("Model 1", 1),
        ("[1]", 1),
        ("(0)", 0),
        ("final answer: 0", 0),
        ("<think>0 or 1? hmm</think>\n1", 1),
        ("1!", 1),
        ("ANSWER: 0", 0),
    ],
)
def test_parser_accepts(text, label):
    assert parse_answer(text) == label


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "\n",
        "2",
        "10",
        "01",
        "0 or 1",
        "1 then 0",
        "0/1",
        "1,0",
        "1.5",
        "1st",
        "-1",
        "+1",
        "A",
        "B",
        "a",
        "yes",
        "no",
        "One",
        "not 1",
        "The answer is not 1",
        "banana",
        "rfurfurfurfu",
        "答案 1",
        "１",
        "Response 0 is worse than 1",
        "1" + "!" * 70,
        "<think>1</think>",
        "I'd say both",
        None,
        1,
        0,
        b"1",
    ],
)
def test_parser_rejects(text):
    assert parse_answer(text) is None


# ---------------------------------------------------------------------------------------------
# order helpers


VERDICTS = st.one_of(
    st.builds(lambda w, c: Verdict(w, c, "r"), st.sampled_from([0, 1]), st.none() | st.floats(0, 1)),
    st.just(Verdict.tied("t")),
    st.just(Verdict.bad("x")),
)


@settings(max_examples=100, deadline=None)
@given(VERDICTS, st.booleans())
def test_unflip_keeps_invalid_and_ties(v, flip):
    u = unflip(v, flip)
    assert u.invalid == v.invalid and u.tie == v.tie and u.raw == v.raw
    if v.winner is None:
        assert u.winner is None
    else:
        assert u.winner == (1 - v.winner if flip else v.winner)
    assert unflip(u, flip) == v


@settings(max_examples=100, deadline=None)
@given(VERDICTS, VERDICTS)
def test_combine_orders(fwd, rev):
    v, flag = combine_orders(fwd, rev)
    if fwd.invalid or rev.invalid:
        assert v.invalid and flag is None
    elif fwd.tie and rev.tie:
        assert v.tie and flag is True
    elif fwd.winner is not None and rev.winner is not None and fwd.winner == 1 - rev.winner:
        assert v.winner == fwd.winner and flag is True
    else:
        assert v.invalid and flag is False and "inconsistent" in v.raw


def test_draw_flips_seeded():
    a, b = draw_flips(random.Random(5), 64), draw_flips(random.Random(5), 64)
    assert a == b and 10 < sum(a) < 54


# ---------------------------------------------------------------------------------------------
# logits mode on the real tiny model


def test_logits_mode_matches_unbatched_reference(tiny_model):
    model, tok = tiny_model
    prompts, pairs = make_pairs(12, seed=1)
    j = LLMJudge(model, tok, seed=3, tie_margin=0.0, batch_size=5)
    vs = j.judge(prompts, pairs)
    flips = j.last_flips
    assert 0 < sum(flips) < len(flips)
    masses = []
    for (p, (a, b)), f, v in zip(zip(prompts, pairs), flips, vs):
        first, second = (b, a) if f else (a, b)
        p_second, l0, l1 = reference_p_second(model, tok, p, first, second)
        masses.append(math.exp(l0) + math.exp(l1))
        p_b = 1.0 - p_second if f else p_second  # P(b better) in the original order
        assert v.winner == (1 if p_b > 0.5 else 0)
        assert v.confidence == pytest.approx(max(p_b, 1 - p_b), abs=1e-4)
        assert v.raw["logprob_0"] == pytest.approx(l0, abs=1e-4)
        assert v.raw["logprob_1"] == pytest.approx(l1, abs=1e-4)
    assert {v.winner for v in vs} == {0, 1}
    assert j.last_metrics["judge/label_mass"] == pytest.approx(np.mean(masses), rel=1e-3)
    assert j.last_metrics["judge/swapped"] == sum(flips)


def test_prefix_cache_and_batching_do_not_change_numbers(tiny_model):
    model, tok = tiny_model
    prompts, pairs = make_pairs(9, seed=2)
    base = LLMJudge(model, tok, shuffle=False, batch_size=32)
    seqs = [base.encode(p, a, b) for p, (a, b) in zip(prompts, pairs)]
    ref = base.label_logprobs(seqs)
    assert base._prefix is not None and len(base._prefix[0]) > 20  # the rubric was shared
    again = base.label_logprobs(seqs)  # the cached prefix is reused
    plain = LLMJudge(model, tok, shuffle=False, batch_size=2)
    plain.prefix_cache = False  # one plain right-padded forward pass per micro-batch
    np.testing.assert_allclose(again, ref, atol=1e-5)
    np.testing.assert_allclose(plain.label_logprobs(seqs), ref, atol=1e-4)
    one = np.array([[reference_p_second(model, tok, p, a, b)[k] for k in (1, 2)] for p, (a, b) in zip(prompts, pairs)])
    np.testing.assert_allclose(ref, one, atol=1e-4)


def test_prefix_cache_follows_weight_changes(tiny_model_path):
    from mlx.utils import tree_flatten
    from mlx_lm import load

    model, tok = load(tiny_model_path)  # a private copy: its weights are changed below
    prompts, pairs = make_pairs(3, seed=4)
    j = LLMJudge(model, tok, shuffle=False)
    seqs = [j.encode(p, a, b) for p, (a, b) in zip(prompts, pairs)]
    before = j.label_logprobs(seqs)
    name = "model.layers.0.self_attn.k_proj.weight"
    model.load_weights([(name, dict(tree_flatten(model.parameters()))[name] * 3.0)], strict=False)
    after = j.label_logprobs(seqs)
    fresh = LLMJudge(model, tok, shuffle=False).label_logprobs(seqs)
    np.testing.assert_allclose(after, fresh, atol=1e-5)
    assert np.abs(after - before).max() > 1e-4


def test_shuffle_maps_winners_back(tiny_model):
    model, tok = tiny_model
    prompts, pairs = make_pairs(16, seed=5)
    fixed = LLMJudge(model, tok, shuffle=False, tie_margin=0.0)
    ab = fixed.judge(prompts, pairs)
    ba = fixed.judge(prompts, [(b, a) for a, b in pairs])
    shuffled = LLMJudge(model, tok, seed=11, tie_margin=0.0)
    vs = shuffled.judge(prompts, pairs)
    for v, f, x, y in zip(vs, shuffled.last_flips, ab, ba):
        want = (1 - y.winner) if f else x.winner
        assert v.winner == want
    same = LLMJudge(model, tok, seed=11, tie_margin=0.0)
    same.judge(prompts, pairs)
    assert same.last_flips == shuffled.last_flips


def test_both_orders_on_real_model(tiny_model):
    model, tok = tiny_model
    prompts, pairs = make_pairs(10, seed=6)
    fixed = LLMJudge(model, tok, shuffle=False, tie_margin=0.0)
    ab = fixed.judge(prompts, pairs)
    ba = fixed.judge(prompts, [(b, a) for a, b in pairs])
    j = LLMJudge(model, tok, both_orders=True, tie_margin=0.0)
    vs = j.judge(prompts, pairs)
    agree = [x.winner == 1 - y.winner for x, y in zip(ab, ba)]
    assert j.last_metrics["judge/position_consistency"] == pytest.approx(sum(agree) / len(agree))
    assert j.last_metrics["judge/both_orders_valid"] == len(pairs)
    for v, ok, x in zip(vs, agree, ab):
        if ok:
            assert v.winner == x.winner and 0.5 <= v.confidence <= 1.0
        else:
            assert v.invalid and "inconsistent" in v.raw


def test_tie_margin_and_min_label_prob(tiny_model):
    model, tok = tiny_model
    prompts, pairs = make_pairs(6, seed=7)
    ties = LLMJudge(model, tok, tie_margin=0.999).judge(prompts, pairs)
    assert all(v.tie and v.winner is None for v in ties)
    # the random model puts ~2/512 of its mass on the labels: an abstaining judge drops all
    j = LLMJudge(model, tok, min_label_prob=0.05)
    vs = j.judge(prompts, pairs)
    assert all(v.invalid for v in vs) and all("min_label_prob" in v.raw["reason"] for v in vs)
    assert 0 < j.last_metrics["judge/label_mass"] < 0.05


def test_empty_call(tiny_model):
    model, tok = tiny_model
    j = LLMJudge(model, tok)
    assert j.judge([], []) == []
    with pytest.raises(ValueError):
        j.judge(["a"], [])


# ---------------------------------------------------------------------------------------------
# the verdict logic with a scripted model (no randomness from weights)


def scripted(judge: LLMJudge, script):
    """Make ``judge`` see (prompt, first, second) triples and answer ``script(...)`` label
    log-probs (logits mode) or texts (generate mode); the verdict logic stays the real one."""
    judge.encode = lambda p, a, b: (p, a, b)
    judge.label_logprobs = lambda seqs: np.array([script(*s) for s in seqs], dtype=np.float64)
    judge._generate = lambda seqs: [script(*s) for s in seqs]
    return judge


def prefer_good(prompt, first, second):
    """Log-probs: consistent preference for the completion that says GOOD, a pure position bias
    on 'biased' prompts, a tie on 'tie' prompts, NaN on 'nan' prompts."""
    if prompt == "biased":
        return [math.log(0.9), math.log(0.1)]
    if prompt == "tie":
        return [math.log(0.3), math.log(0.3)]
    if prompt == "nan":
        return [float("nan"), 0.0]
    return [math.log(0.8), math.log(0.2)] if "GOOD" in first else [math.log(0.2), math.log(0.8)]


def test_scripted_both_orders_metric(tiny_model):
    model, tok = tiny_model
    j = scripted(LLMJudge(model, tok, both_orders=True), prefer_good)
    prompts = ["p", "p", "biased", "tie", "nan", "biased"]
    pairs = [("GOOD", "bad"), ("bad", "GOOD"), ("GOOD", "bad"), ("x", "y"), ("a", "b"), ("a", "b")]
    vs = j.judge(prompts, pairs)
    assert [v.winner for v in vs] == [0, 1, None, None, None, None]
    assert vs[0].confidence == pytest.approx(0.8) and vs[1].confidence == pytest.approx(0.8)
    assert vs[3].tie and vs[4].invalid and not vs[4].tie
    assert vs[2].invalid and "inconsistent" in vs[2].raw
    # valid in both orders: 5 pairs (not the NaN one); consistent: GOOD x2 and the tie
    assert j.last_metrics["judge/both_orders_valid"] == 5
    assert j.last_metrics["judge/position_consistency"] == pytest.approx(3 / 5)


def test_scripted_shuffle_never_relabels_invalid(tiny_model):
    model, tok = tiny_model
    j = scripted(LLMJudge(model, tok, seed=1), prefer_good)
    prompts = ["p", "nan", "tie", "p"] * 8
    pairs = [("GOOD", "bad"), ("a", "b"), ("a", "b"), ("bad", "GOOD")] * 8
    vs = j.judge(prompts, pairs)
    assert 0 < sum(j.last_flips) < len(pairs)
    assert [v.winner for v in vs] == [0, None, None, 1] * 8
    assert all(v.invalid for v in vs[1::4]) and all(v.tie for v in vs[2::4])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(["ok0", "ok1", "nan", "inf", "tie"]), min_size=1, max_size=24), st.integers(0, 10_000))
def test_property_logits_invalid_stays_invalid(tiny_model, kinds, seed):
    model, tok = tiny_model
    table = {
        "ok0": [-1.0, -3.0],
        "ok1": [-3.0, -1.0],
        "nan": [float("nan"), -1.0],
        "inf": [float("-inf"), float("-inf")],
        "tie": [-2.0, -2.0],
    }
    j = scripted(LLMJudge(model, tok, seed=seed), lambda p, a, b: table[p])
    vs = j.judge(kinds, [("a", "b")] * len(kinds))
    for k, f, v in zip(kinds, j.last_flips, vs):
        if k in ("nan", "inf"):
            assert v.invalid
        elif k == "tie":
            assert v.tie
        else:
            shown = int(k[-1])
            assert v.winner == (1 - shown if f else shown)


def test_generate_mode_scripted(tiny_model):
    model, tok = tiny_model

    def answer(prompt, first, second):
        if prompt == "pos":  # names the position of GOOD
            return "Answer: 0" if "GOOD" in first else "The answer is 1."
        return prompt  # otherwise the prompt is the answer

    j = scripted(LLMJudge(model, tok, mode="generate", seed=2), answer)
    prompts = ["pos", "pos", "banana", "0 or 1", "2", "pos"] * 4
    pairs = [("GOOD", "x"), ("x", "GOOD"), ("a", "b"), ("a", "b"), ("a", "b"), ("y", "GOOD")] * 4
    vs = j.judge(prompts, pairs)
    assert 0 < sum(j.last_flips) < len(pairs)
    assert [v.winner for v in vs] == [0, 1, None, None, None, 1] * 4
    assert all(v.invalid and v.raw == p for v, p in zip(vs, prompts) if p != "pos")
    j2 = scripted(LLMJudge(model, tok, mode="generate", both_orders=True), answer)
    vs = j2.judge(["pos", "pos", "banana"], [("GOOD", "x"), ("x", "GOOD"), ("a", "b")])
    assert [v.winner for v in vs] == [0, 1, None]
    assert j2.last_metrics["judge/position_consistency"] == 1.0
    assert j2.last_metrics["judge/both_orders_valid"] == 2


def test_generate_mode_real_model(tiny_model):
    model, tok = tiny_model
    prompts, pairs = make_pairs(4, seed=8)
    j = LLMJudge(model, tok, mode="generate", max_tokens=4, seed=0)
    vs = j.judge(prompts, pairs)
    assert len(vs) == 4
    for v, f in zip(vs, j.last_flips):
        assert isinstance(v.raw, str)
        w = parse_answer(v.raw)
        if w is None:
            assert v.invalid  # the random model's garbage is never a label
        else:
            assert v.winner == (1 - w if f else w)


def test_generate_mode_texts_match_unbatched_generate(tiny_model):
    from mlx_lm import generate

    model, tok = tiny_model
    prompts, pairs = make_pairs(5, seed=9)
    fast = LLMJudge(model, tok, mode="generate", max_tokens=5, shuffle=False, batch_size=3)
    plain = LLMJudge(model, tok, mode="generate", max_tokens=5, shuffle=False)
    plain.prefix_cache = False
    got = [v.raw for v in fast.judge(prompts, pairs)]
    assert fast._prefix is not None  # the shared prefix was used
    assert got == [v.raw for v in plain.judge(prompts, pairs)]
    for (p, (a, b)), text in zip(zip(prompts, pairs), got):
        chat = tok.apply_chat_template(pair_messages(None, p, a, b), tokenize=False, add_generation_prompt=True)
        assert generate(model, tok, chat, max_tokens=5) == text


# ---------------------------------------------------------------------------------------------
# labels


class _FakeTok:
    def __init__(self, table):
        self.table = table

    def encode(self, text, add_special_tokens=False):
        return self.table[text]

    def decode(self, ids):
        return {1: "▁", 2: "0", 3: "1", 4: "x"}[ids[0]]


def test_label_tokens(tiny_model):
    _, tok = tiny_model
    assert label_token_ids(tok) == (
        tok.encode("0", add_special_tokens=False)[0],
        tok.encode("1", add_special_tokens=False)[0],
    )
    # SentencePiece-style: a blank piece first, then the digit
    assert label_token_ids(_FakeTok({"0": [1, 2], "1": [1, 3]})) == (2, 3)
    with pytest.raises(ConfigError, match="same first token"):
        label_token_ids(_FakeTok({"0": [4, 2], "1": [4, 3]}))


# ---------------------------------------------------------------------------------------------
# factory: check and build


def test_build_reuses_reference_model(tiny_model, tiny_model_path, registry):
    model, tok = tiny_model
    ctx = JudgeContext(
        judge_system="Prefer kind answers. Answer 0 or 1.",
        judge_config={"both_orders": True, "batch_size": 4},
        reference_model=model,
        reference_tokenizer=tok,
        reference_model_path=tiny_model_path,
        seed=1,
    )
    j = build_judge(tiny_model_path, ctx, registry)
    assert j.model is model and j.tokenizer is tok and j.both_orders and j.batch_size == 4
    assert j.rubric == ctx.judge_system
    vs = j.judge(["p"], [("a", "b")])
    assert len(vs) == 1 and "judge/position_consistency" in j.last_metrics


def test_build_loads_a_model_folder(tiny_model_path, registry):
    j = build_judge(tiny_model_path, JudgeContext(judge_config={"mode": "logits"}), registry)
    assert isinstance(j, LLMJudge) and j.rubric is None
    assert len(j.judge(["p", "q"], [("a", "b"), ("c", "d")])) == 2


def test_check_is_cheap(tiny_model_path):
    code = (
        "import sys; from mlx_xpo_plugin.host.registry import Registry, check_judge;"
        "from mlx_xpo_plugin.judges.builtin import BUILTIN_JUDGE_FACTORIES as F;"
        "from mlx_xpo_plugin.contracts import JudgeContext;"
        "r = Registry(judges={f.name: f for f in F});"
        f"print(check_judge({tiny_model_path!r}, JudgeContext(), r).name,"
        " 'mlx_lm' in sys.modules, 'mlx.core' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["llm", "False", "False"]


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    return cache


def test_hub_id_not_in_the_cache_is_refused_offline(empty_hf_cache, registry):
    with pytest.raises(ConfigError) as e:  # tests run with HF_HUB_OFFLINE=1 (conftest.py)
        check_judge("xpo-test-org/not-downloaded-model", JudgeContext(), registry)
    msg = str(e.value)
    assert msg.startswith("judge: 'xpo-test-org/not-downloaded-model': HF_HUB_OFFLINE is set") and "\n" not in msg
    assert "`hf download xpo-test-org/not-downloaded-model`" in msg


def test_hub_id_already_in_local_cache_is_used(empty_hf_cache, tiny_model_path, registry):
    snap = empty_hf_cache / "models--xpo-test-org--tiny" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_model_path, snap)
    (empty_hf_cache / "models--xpo-test-org--tiny" / "refs").mkdir()
    (empty_hf_cache / "models--xpo-test-org--tiny" / "refs" / "main").write_text("a" * 40)
    check_judge("xpo-test-org/tiny", JudgeContext(), registry)
    j = build_judge("xpo-test-org/tiny", JudgeContext(), registry)
    assert len(j.judge(["p"], [("a", "b")])) == 1


def test_path_errors(tmp_path, registry):
    with pytest.raises(ConfigError, match="no such model folder"):
        check_judge(str(tmp_path / "missing"), JudgeContext(), registry)
    (tmp_path / "weights.bin").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        check_judge(str(tmp_path / "weights.bin"), JudgeContext(), registry)
    with pytest.raises(ConfigError, match="no config.json"):
        check_judge(str(tmp_path), JudgeContext(), registry)


@pytest.mark.parametrize(
    "cfg, needle",
    [
        ({"tie_margn": 0.1}, "did you mean 'tie_margin'"),
        ({"both_order": True}, "did you mean 'both_orders'"),
        ({"mode": "sample"}, "judge_config.mode: 'sample' is not valid; valid: logits, generate"),
        ({"batch_size": 0}, "judge_config.batch_size: 0 is not valid; must be >= 1"),
        ({"tie_margin": "small"}, "expected a number"),
        ({"tie_margin": 1.5}, "must be < 1.0"),
        ({"tie_margin": 1.0}, "must be < 1.0"),
        ({"both_orders": "true"}, "expected true or false"),
        ({"max_tokens": 2.0}, "expected an integer"),
    ],
)
def test_bad_judge_config(cfg, needle, tiny_model_path, registry):
    with pytest.raises(ConfigError) as e:
        check_judge(tiny_model_path, JudgeContext(judge_config=cfg), registry)
    assert needle in str(e.value)


def test_default_rubric_asks_for_the_labels():
    msgs = pair_messages(None, "P", "A", "B")
    assert msgs[0]["content"] == DEFAULT_RUBRIC
    assert "Response 0:\nA" in msgs[1]["content"] and "Response 1:\nB" in msgs[1]["content"]
    assert msgs[1]["content"].endswith("(0 or 1)?")
    custom = pair_messages("Be strict.", "P", "A", "B")
    assert custom[0]["content"] == "Be strict." and custom[1] == msgs[1]

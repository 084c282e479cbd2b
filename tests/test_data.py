"""The prompt loader: both formats, clear errors with file:line, never an unexpected exception."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_xpo_plugin.commands.data import load_prompts, read_rows
from mlx_xpo_plugin.errors import ConfigError


def write(tmp_path, lines, name="train.jsonl"):
    p = tmp_path / name
    p.write_text("".join(l + "\n" for l in lines))
    return str(p)


def test_standard_and_conversational_rows(tmp_path, tiny_model):
    _, tok = tiny_model
    rows = [
        json.dumps({"prompt": "Hello?"}),
        json.dumps({"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}),
        json.dumps({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}),
    ]
    write(tmp_path, rows)
    ps = load_prompts(str(tmp_path), "train", tok, 1000)
    assert len(ps) == 3 and ps.texts[0] == "Hello?"
    assert ps.ids[0] == list(
        tok.apply_chat_template([{"role": "user", "content": "Hello?"}], add_generation_prompt=True)
    )
    assert "Be brief." in ps.texts[1]


def test_long_prompts_are_truncated_from_the_left_with_a_count(tmp_path, tiny_model):
    _, tok = tiny_model
    write(tmp_path, [json.dumps({"prompt": "word " * 200}), json.dumps({"prompt": "short"})])
    msgs = []
    ps = load_prompts(str(tmp_path), "train", tok, 20, warn=msgs.append)
    assert len(ps.ids[0]) == 20 and len(ps.ids[1]) < 20
    assert (
        ps.ids[0][-3:]
        == list(tok.apply_chat_template([{"role": "user", "content": "word " * 200}], add_generation_prompt=True))[-3:]
    )
    assert len(msgs) == 1 and "1 of 2 train prompts" in msgs[0]


@pytest.mark.parametrize(
    "line,pattern",
    [
        ('{"question": "x"}', r"train.jsonl:1: .*no usable prompt"),
        ('{"prompt": ""}', r"train.jsonl:1: .*empty"),
        ('{"prompt": 5}', r'train.jsonl:1: .*"prompt" must be'),
        ("not json", r"train.jsonl:1: .*not valid JSON"),
        ('{"prompt": [{"role": "wizard", "content": "x"}]}', r"unknown role"),
        ('{"messages": [{"role": "assistant", "content": "x"}]}', r"end with a user message"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, line, pattern):
    path = write(tmp_path, [line])
    with pytest.raises(ConfigError, match=pattern):
        read_rows(path)


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(ConfigError, match="no prompts"):
        read_rows(write(tmp_path, ["", "  "]))
    with pytest.raises(ConfigError, match="file not found"):
        read_rows(str(tmp_path / "nope.jsonl"))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
    max_leaves=8,
)
rows = st.one_of(
    json_values.map(json.dumps),
    st.dictionaries(st.sampled_from(["prompt", "messages", "role", "content", "x"]), json_values, max_size=3).map(
        json.dumps
    ),
    st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "system", "assistant", "bot"]), "content": st.text(max_size=5)}
        ),
        max_size=3,
    ).map(lambda m: json.dumps({"prompt": m})),
    st.text(max_size=20).filter(lambda s: "\n" not in s and "\r" not in s),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(rows, max_size=4))
def test_random_rows_give_rows_or_a_clear_error(tmp_path_factory, lines):
    path = write(tmp_path_factory.mktemp("h"), lines)
    try:
        out = read_rows(path)
    except ConfigError as e:
        assert "\n" not in str(e)
    else:
        assert out and all(m[-1]["role"] in ("user", "tool") for m in out)

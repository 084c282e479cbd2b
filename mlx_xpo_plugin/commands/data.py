"""Prompt-only datasets: ``{train,valid,test}.jsonl`` in the ``data`` folder.

Accepted rows (one JSON object per line):
  standard:        {"prompt": "What is the capital of France?"}
  conversational:  {"prompt": [{"role": "system", "content": ...}, {"role": "user", "content": ...}]}
                   {"messages": [...]}   (a trailing assistant message is dropped)
Prompts are tokenised once with the tokenizer's chat template (generation prompt added).
"""

from __future__ import annotations

import json
import os
from typing import Optional

from mlx_xpo_plugin.errors import ConfigError
from mlx_xpo_plugin.loop.prompts import PromptSet

ROLES = ("system", "user", "assistant", "tool")


def _messages(row, where: str) -> list:
    if not isinstance(row, dict):
        raise ConfigError(where, row, 'each line must be a JSON object such as {"prompt": "..."}')
    key = "prompt" if "prompt" in row else "messages" if "messages" in row else None
    if key is None:
        raise ConfigError(
            where,
            sorted(row)[:5],
            'no usable prompt: expected a "prompt" string or a '
            '"prompt"/"messages" list of {"role", "content"} messages',
        )
    v = row[key]
    if isinstance(v, str):
        if not v.strip():
            raise ConfigError(where, v, "the prompt is empty")
        return [{"role": "user", "content": v}]
    if (
        isinstance(v, list)
        and v
        and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in v)
    ):
        msgs = [dict(role=m["role"], content=m["content"]) for m in v]
        bad = [m["role"] for m in msgs if m["role"] not in ROLES]
        if bad:
            raise ConfigError(where, bad[0], f"unknown role; valid: {', '.join(ROLES)}")
        if key == "messages" and msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]
        if not msgs or msgs[-1]["role"] not in ("user", "tool"):
            raise ConfigError(where, v, "a conversational prompt must end with a user message")
        return msgs
    raise ConfigError(
        where, v, f'"{key}" must be a non-empty string or a list of {{"role": ..., "content": ...}} messages'
    )


def read_rows(path: str) -> list:
    """Parsed message lists of a JSONL file; errors name the file and line."""
    if not os.path.isfile(path):
        raise ConfigError("data", path, "file not found")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(where, line.strip()[:60], f"not valid JSON ({e.msg})")
            rows.append(_messages(obj, where))
    if not rows:
        raise ConfigError("data", path, "the file has no prompts")
    return rows


def split_path(data_dir: str, split: str) -> str:
    return os.path.join(data_dir, f"{split}.jsonl")


def check_data(data_dir: str, need_train: bool, need_test: bool) -> int:
    """Cheap checks before any model is loaded; returns the number of training prompts."""
    if not os.path.isdir(data_dir):
        raise ConfigError(
            "data",
            data_dir,
            "expected a local folder with train.jsonl (and valid.jsonl, "
            "test.jsonl); hub datasets are not fetched by this plugin",
        )
    n_train = len(read_rows(split_path(data_dir, "train"))) if need_train else 0
    if need_test:
        read_rows(split_path(data_dir, "test"))
    return n_train


def truncate_prompt(ids, max_len: int) -> tuple[list, bool]:
    """Keep the last `max_len` tokens (left truncation); returns (ids, truncated?)."""
    ids = list(ids)
    if len(ids) <= max_len:
        return ids, False
    return ids[len(ids) - max_len :], True


def load_prompts(
    data_dir: str, split: str, tokenizer, max_prompt_tokens: int, required: bool = True, warn=print
) -> Optional[PromptSet]:
    path = split_path(data_dir, split)
    if not required and not os.path.isfile(path):
        return None
    ids, texts, truncated = [], [], 0
    for msgs in read_rows(path):
        toks = tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
        if hasattr(toks, "input_ids"):
            toks = toks["input_ids"]
        toks, cut = truncate_prompt(toks, max_prompt_tokens)
        truncated += cut
        ids.append(toks)
        # the judge sees the user's text; a conversation is shown to it as rendered by the template
        texts.append(
            msgs[-1]["content"]
            if len(msgs) == 1
            else tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        )
    if truncated:
        warn(
            f"warning: {truncated} of {len(ids)} {split} prompts are longer than {max_prompt_tokens} "
            "tokens (max_seq_length - max_completion_length) and were truncated from the left"
        )
    return PromptSet(ids, texts)

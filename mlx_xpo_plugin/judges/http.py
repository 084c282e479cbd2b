"""OpenAI-compatible chat-completions judge: ``judge: http://127.0.0.1:8080`` (mlx_lm.server,
LM Studio, Ollama, vLLM, a hosted API). Standard library only.

The URL may be a base (``http://host:port`` or ``http://host:port/v1``) or the full
``.../v1/chat/completions``; it is normalised to the latter. Each pair is one POST with the same
messages the MLX model judge uses (rubric as the system message, then the prompt and the two
responses, asking for one digit), and the answer ``choices[0].message.content`` is read by the
same lenient parser (:func:`parse.parse_answer`). Pairs are shuffled (each shown swapped with
probability 1/2, seeded) and mapped back; with ``both_orders: true`` each pair is asked in both
orders and only consistent verdicts count.

``judge_config``: ``model`` (name sent in the request; left out when unset, so that the server
uses its default model), ``api_key_env`` (the NAME of an environment variable holding the API key,
sent as ``Authorization: Bearer``; never the key itself), ``timeout`` (seconds per request,
default 30), ``max_retries`` (default 2; connection errors, timeouts, HTTP 408/429/5xx are
retried with exponential backoff ``backoff * 2**attempt``, ``backoff`` default 0.5 s),
``concurrency`` (parallel requests, default 4), ``max_tokens`` (default 8), ``temperature``
(default 0), ``shuffle`` (default true), ``both_orders`` (default false).

Failures never become labels and never hang training: every request has a timeout, retries are
bounded, and the whole call has a deadline. HTTP errors, timeouts, bad JSON and unparseable
answers are invalid verdicts; ``last_metrics`` counts ``judge/http_errors`` (pairs whose request
failed after its retries), by kind as ``judge/errors/<kind>`` (``connection_refused``,
``timeout``, ``connection``, ``http_<status>``, ``bad_reply``, ``deadline``),
``judge/http_retries`` and ``judge/unparsed`` (answers received but not understood).
"""

from __future__ import annotations

import concurrent.futures as cf
import http.client
import json
import os
import random
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Optional, Sequence

from mlx_xpo_plugin.config import Setting
from mlx_xpo_plugin.contracts import JudgeContext, Verdict
from mlx_xpo_plugin.errors import ConfigError
from mlx_xpo_plugin.judges.common import SeededOrder, judge_in_order, options, pair_messages, resolve_options
from mlx_xpo_plugin.judges.parse import parse_answer, unparsed

OPTIONS = options(
    Setting("model", "str", None, "the model name sent to the endpoint"),
    Setting(
        "api_key_env",
        "str",
        None,
        "the NAME of an environment variable (letters, digits, _), never the key itself",
        pattern=r"[A-Za-z_][A-Za-z0-9_]*",
        secret=True,
    ),
    Setting("timeout", "float", 30.0, "seconds per request", minimum=0, exclusive_minimum=True, maximum=3600),
    Setting("max_retries", "int", 2, "retries of a failed request", minimum=0, maximum=10),
    Setting("backoff", "float", 0.5, "seconds before the first retry (doubled each time)", minimum=0, maximum=60),
    Setting("concurrency", "int", 4, "requests in flight", minimum=1, maximum=64),
    Setting("max_tokens", "int", 8, "tokens of the answer", minimum=1, maximum=4096),
    Setting("temperature", "float", 0.0, "the judge's sampling temperature", minimum=0, maximum=2),
    Setting("shuffle", "bool", True, "show each pair in a random order"),
    Setting("both_orders", "bool", False, "judge both orders, keep consistent verdicts"),
)

_RETRY_STATUS = {408, 429, 500, 502, 503, 504}
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def normalise_url(url: str) -> str:
    """``.../v1/chat/completions`` for a base URL, a ``/v1`` URL or the full URL."""
    u = url.strip().rstrip("/")
    if u.endswith("/chat/completions"):
        return u
    if u.endswith("/v1"):
        return u + "/chat/completions"
    return u + "/v1/chat/completions"


def matches(spec: str) -> bool:
    return isinstance(spec, str) and spec.strip().lower().startswith(("http://", "https://"))


class _Failed(Exception):
    """A request that failed for good (after retries): (text, retries, kind)."""


def error_kind(e: BaseException) -> str:
    """The kind a failed request is counted under (``judge/errors/<kind>``)."""
    reason = getattr(e, "reason", e)
    if isinstance(reason, ConnectionRefusedError):
        return "connection_refused"
    if isinstance(reason, (socket.timeout, TimeoutError)):
        return "timeout"
    return "connection"  # reset, DNS failure, TLS error, bad HTTP framing


class HTTPJudge(SeededOrder):
    """A PairwiseJudge that asks an OpenAI-compatible chat-completions endpoint."""

    concurrent = True  # it waits for the server: the reference pass computes meanwhile

    def __init__(self, url: str, rubric: Optional[str] = None, seed: int = 0, **options):
        opts = resolve_options("http", options, OPTIONS)
        self.url = normalise_url(url)
        self.rubric = rubric
        self.model, self.api_key_env = opts["model"], opts["api_key_env"]
        self.timeout, self.max_retries = float(opts["timeout"]), int(opts["max_retries"])
        self.backoff, self.concurrency = float(opts["backoff"]), int(opts["concurrency"])
        self.max_tokens, self.temperature = int(opts["max_tokens"]), float(opts["temperature"])
        self.shuffle, self.both_orders = opts["shuffle"], opts["both_orders"]
        self.rng = random.Random(seed)
        host = urllib.parse.urlsplit(self.url).hostname or ""
        # a local server is reached directly, whatever *_proxy says
        handlers = [urllib.request.ProxyHandler({})] if host in _LOOPBACK else []
        self._opener = urllib.request.build_opener(*handlers)
        self._pool = cf.ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="http-judge")
        self.last_metrics: dict = {}
        self.last_flips: list[bool] = []

    # -- one request
    def _headers(self) -> dict:
        h = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key_env:
            key = os.environ.get(self.api_key_env)
            if key:
                h["Authorization"] = f"Bearer {key}"
        return h

    def _body(self, prompt: str, first: str, second: str) -> bytes:
        body = {
            "messages": pair_messages(self.rubric, prompt, first, second),
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "stream": False,
        }
        if self.model:
            body["model"] = self.model
        return json.dumps(body).encode()

    def _post(self, data: bytes) -> tuple[dict, int]:
        """The decoded JSON reply and the number of retries used; raises _Failed."""
        retries, last, kind = 0, "", "connection"
        for attempt in range(self.max_retries + 1):
            if attempt:
                retries += 1
                time.sleep(self.backoff * (2 ** (attempt - 1)))
            req = urllib.request.Request(self.url, data=data, headers=self._headers(), method="POST")
            try:
                with self._opener.open(req, timeout=self.timeout) as resp:
                    raw = resp.read()
            except urllib.error.HTTPError as e:
                last, kind = f"HTTP {e.code} {e.reason}", f"http_{e.code}"
                try:
                    e.close()
                except Exception:
                    pass
                if e.code in _RETRY_STATUS:
                    continue
                raise _Failed(last, retries, kind)
            except (
                urllib.error.URLError,
                socket.timeout,
                TimeoutError,
                ConnectionError,
                OSError,
                http.client.HTTPException,
            ) as e:
                reason = getattr(e, "reason", e)
                last, kind = f"{type(reason).__name__}: {reason}", error_kind(e)
                continue
            try:
                return json.loads(raw.decode("utf-8")), retries
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise _Failed(f"bad JSON: {e}", retries, "bad_reply")
        raise _Failed(last, retries, kind)

    def _ask(self, prompt: str, first: str, second: str) -> tuple[Verdict, str, int]:
        """(verdict, outcome, retries); outcome is 'ok', 'unparsed' or an error kind."""
        try:
            reply, retries = self._post(self._body(prompt, first, second))
        except _Failed as e:
            return Verdict.bad({"error": e.args[0]}), e.args[2], e.args[1]
        try:
            content = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            return (
                Verdict.bad({"error": "no choices[0].message.content in the reply", "reply": str(reply)[:200]}),
                "bad_reply",
                retries,
            )
        w = parse_answer(content)
        if w is None:
            return Verdict.bad(content, unparsed(content)), "unparsed", retries
        return Verdict(w, None, content), "ok", retries

    def _deadline(self) -> float:
        """An upper bound for one request with its retries, plus slack."""
        waits = sum(self.backoff * 2**k for k in range(self.max_retries))
        return (self.max_retries + 1) * (self.timeout + 1.0) + waits + 5.0

    def judge_ordered(self, triples: Sequence[tuple[str, str, str]]):
        """Ask every (prompt, first, second) as given; (verdicts, metrics)."""
        futures = [self._pool.submit(self._ask, p, a, b) for p, a, b in triples]
        per_round = -(-len(futures) // self.concurrency) if futures else 0
        done, _ = cf.wait(futures, timeout=self._deadline() * max(per_round, 1))
        verdicts, unparsed, retries, kinds = [], 0, 0, {}
        self.last_error = None  # "kind: reason" of the last failed request (shown on the step's line)
        for f in futures:
            if f not in done:
                f.cancel()
                verdicts.append(Verdict.bad({"error": "deadline exceeded"}))
                kinds["deadline"] = kinds.get("deadline", 0) + 1
                self.last_error = "deadline: deadline exceeded"
                continue
            v, outcome, r = f.result()
            verdicts.append(v)
            if outcome not in ("ok", "unparsed"):
                kinds[outcome] = kinds.get(outcome, 0) + 1
                self.last_error = f"{outcome}: {v.raw.get('error') if isinstance(v.raw, dict) else v.raw}"
            unparsed += outcome == "unparsed"
            retries += r
        return verdicts, {
            "judge/http_errors": sum(kinds.values()),
            "judge/unparsed": unparsed,
            "judge/http_retries": retries,
            **{f"judge/errors/{k}": n for k, n in sorted(kinds.items())},
        }

    def judge(self, prompts: Sequence[str], pairs: Sequence[tuple[str, str]]) -> list[Verdict]:
        def ordered(triples):
            vs, metrics = self.judge_ordered(triples)
            return vs, [None] * len(vs), metrics

        out, self.last_metrics, self.last_flips = judge_in_order(
            prompts, pairs, ordered, both_orders=self.both_orders, shuffle=self.shuffle, rng=self.rng
        )
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def check(spec: str, ctx: JudgeContext) -> None:
    opts = resolve_options("http", ctx.judge_config, OPTIONS)
    parts = urllib.parse.urlsplit(spec.strip())
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            "judge",
            spec,
            "an endpoint judge needs a URL like http://127.0.0.1:8080 or https://host/v1/chat/completions",
        )
    try:
        parts.port
    except ValueError:
        raise ConfigError("judge", spec, "the port of the URL is not a number in 0-65535")
    env = opts["api_key_env"]
    if env is not None and env not in os.environ:
        raise ConfigError(
            "judge_config.api_key_env",
            env,
            "names an environment variable that is not set",
            f"export {env}=... before training (give the variable's name, never the key itself)",
        )


def build(spec: str, ctx: JudgeContext) -> HTTPJudge:
    check(spec, ctx)
    return HTTPJudge(spec, rubric=ctx.judge_system, seed=ctx.seed, **(ctx.judge_config or {}))

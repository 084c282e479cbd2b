"""The OpenAI-compatible endpoint judge: against a stdlib stub with canned answers and failures,
and against a real ``mlx_lm server`` serving the tiny model. Only 127.0.0.1 is ever used."""

from __future__ import annotations

import json
import random
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mlx_xpo_plugin.contracts import JudgeContext
from mlx_xpo_plugin.errors import ConfigError
from mlx_xpo_plugin.host.registry import Registry, build_judge, check_judge
from mlx_xpo_plugin.judges.builtin import BUILTIN_JUDGE_FACTORIES
from mlx_xpo_plugin.judges.http import HTTPJudge, normalise_url
from mlx_xpo_plugin.judges.parse import parse_answer


@pytest.fixture
def registry():
    return Registry(judges={f.name: f for f in BUILTIN_JUDGE_FACTORIES})


# ---------------------------------------------------------------------------------------------
# the stub endpoint

_SHOWN = re.compile(r"Prompt:\n(.*?)\n\nResponse 0:\n(.*?)\n\nResponse 1:\n(.*?)\n\n", re.DOTALL)


class Stub:
    """Answers by the prompt of each request:

    ``say:<text>`` -> <text>; ``pos`` -> the position of the response that says GOOD;
    ``first`` -> always "0" (pure position bias); ``fail-once:<k>`` -> HTTP 500 the first time,
    then "1"; ``always-500``; ``http-404``; ``slow`` -> "1" after 2 s; ``badjson``;
    ``nochoices`` -> JSON without choices.
    """

    def __init__(self):
        self.requests: list[dict] = []
        self.seen = Counter()
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code: int, payload: bytes):
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt, first, second = _SHOWN.search(body["messages"][1]["content"]).groups()
                with stub.lock:
                    stub.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
                    stub.seen[prompt] += 1
                    count = stub.seen[prompt]
                if prompt.startswith("say:"):
                    answer = prompt[4:]
                elif prompt == "pos":
                    answer = "0" if first == "GOOD" else "1"
                elif prompt == "first":
                    answer = "0"
                elif prompt.startswith("fail-once") and count == 1:
                    return self._send(500, b'{"error": "busy"}')
                elif prompt.startswith("fail-once"):
                    answer = "1"
                elif prompt == "always-500":
                    return self._send(500, b'{"error": "down"}')
                elif prompt == "http-404":
                    return self._send(404, b'{"error": "no such route"}')
                elif prompt == "slow":
                    time.sleep(2.0)
                    answer = "1"
                elif prompt == "badjson":
                    return self._send(200, b"this is {not json")
                elif prompt == "nochoices":
                    return self._send(200, b'{"object": "chat.completion"}')
                else:
                    answer = "?"
                reply = {"choices": [{"index": 0, "message": {"role": "assistant", "content": answer}}]}
                self._send(200, json.dumps(reply).encode())

        class Server(ThreadingHTTPServer):
            request_queue_size = 128  # the default 5 drops connections of a concurrent judge

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub():
    s = Stub()
    yield s
    s.close()


def make(stub_or_url, **cfg) -> HTTPJudge:
    url = stub_or_url.url if isinstance(stub_or_url, Stub) else stub_or_url
    cfg.setdefault("backoff", 0.01)
    return HTTPJudge(url, **cfg)


# ---------------------------------------------------------------------------------------------
# happy path, parsing, shuffling


def test_canned_answers(stub):
    j = make(stub, shuffle=False, model="judge-model", max_tokens=5)
    vs = j.judge(["say:1", "say:Answer: 0", "say:banana", "say:0 or 1", "say:2"], [("a", "b")] * 5)
    assert [v.winner for v in vs] == [1, 0, None, None, None]
    assert all(v.invalid for v in vs[2:]) and vs[2].raw == "banana"
    assert j.last_metrics == {"judge/http_errors": 0, "judge/unparsed": 3, "judge/http_retries": 0, "judge/swapped": 0}
    r = stub.requests[0]
    assert r["path"] == "/v1/chat/completions" and r["auth"] is None
    assert r["body"]["model"] == "judge-model" and r["body"]["max_tokens"] == 5
    assert r["body"]["temperature"] == 0 and r["body"]["stream"] is False
    assert [m["role"] for m in r["body"]["messages"]] == ["system", "user"]
    j.close()


def test_model_left_out_and_rubric_sent(stub, registry):
    ctx = JudgeContext(judge_system="Prefer GOOD.", judge_config={"shuffle": False})
    j = build_judge(stub.url + "/v1/", ctx, registry)
    assert j.judge(["say:1"], [("a", "b")])[0].winner == 1
    body = stub.requests[0]["body"]
    assert "model" not in body and body["messages"][0]["content"] == "Prefer GOOD."
    j.close()


def test_shuffle_maps_back(stub):
    j = make(stub, seed=3, concurrency=8)
    n = 24
    pairs = [("GOOD", "bad") if i % 2 else ("bad", "GOOD") for i in range(n)]
    vs = j.judge(["pos"] * n, pairs)
    assert 0 < sum(j.last_flips) < n
    assert [v.winner for v in vs] == [0 if i % 2 else 1 for i in range(n)]
    # the stub really saw swapped orders
    firsts = Counter(r["body"]["messages"][1]["content"].split("Response 0:\n")[1][:4] for r in stub.requests)
    assert firsts["GOOD"] > 0 and firsts["bad\n"] > 0
    j.close()


def test_both_orders(stub):
    j = make(stub, both_orders=True)
    vs = j.judge(["pos", "pos", "first", "say:banana"], [("GOOD", "x"), ("x", "GOOD"), ("a", "b"), ("a", "b")])
    assert [v.winner for v in vs] == [0, 1, None, None]
    assert "inconsistent" in vs[2].raw and vs[3].invalid
    assert j.last_metrics["judge/position_consistency"] == pytest.approx(2 / 3)
    assert j.last_metrics["judge/both_orders_valid"] == 3
    assert len(stub.requests) == 8
    j.close()


def test_property_random_mix_never_labels_invalid(stub):
    rng = random.Random(0)
    answers = [
        "0",
        "1",
        "Answer: 1",
        "Output 0",
        "banana",
        "",
        "2",
        "0 1",
        "A",
        "-1",
        "badjson",
        "nochoices",
        "http-404",
    ]
    prompts = []
    for _ in range(60):
        a = rng.choice(answers)
        prompts.append(a if a in ("badjson", "nochoices", "http-404") else "say:" + a)
    j = make(stub, seed=7, concurrency=6, max_retries=1)
    vs = j.judge(prompts, [("a", "b")] * len(prompts))
    errors = unparsed = 0
    for p, f, v in zip(prompts, j.last_flips, vs):
        if not p.startswith("say:"):
            assert v.invalid and "error" in v.raw
            errors += 1
            continue
        w = parse_answer(p[4:])
        if w is None:
            assert v.invalid and v.raw == p[4:]
            unparsed += 1
        else:
            assert v.winner == (1 - w if f else w)
    assert 0 < sum(j.last_flips) < len(prompts)
    assert j.last_metrics["judge/http_errors"] == errors > 0
    assert j.last_metrics["judge/unparsed"] == unparsed > 0
    j.close()


# ---------------------------------------------------------------------------------------------
# failures


def test_retry_then_success(stub):
    j = make(stub, shuffle=False, max_retries=2)
    vs = j.judge(["fail-once:1", "fail-once:2", "say:0"], [("a", "b")] * 3)
    assert [v.winner for v in vs] == [1, 1, 0]
    assert j.last_metrics == {"judge/http_errors": 0, "judge/unparsed": 0, "judge/http_retries": 2, "judge/swapped": 0}
    assert stub.seen["fail-once:1"] == 2
    j.close()


def test_retries_are_bounded(stub):
    j = make(stub, shuffle=False, max_retries=3, backoff=0.01)
    t0 = time.monotonic()
    v = j.judge(["always-500"], [("a", "b")])[0]
    assert time.monotonic() - t0 < 5
    assert v.invalid and v.raw == {"error": "HTTP 500 Internal Server Error"}
    assert stub.seen["always-500"] == 4
    assert j.last_metrics == {
        "judge/http_errors": 1,
        "judge/unparsed": 0,
        "judge/errors/http_500": 1,
        "judge/http_retries": 3,
        "judge/swapped": 0,
    }
    j.close()


def test_client_errors_are_not_retried(stub):
    j = make(stub, shuffle=False, max_retries=3)
    v = j.judge(["http-404"], [("a", "b")])[0]
    assert v.invalid and "HTTP 404" in v.raw["error"] and stub.seen["http-404"] == 1
    assert j.last_metrics["judge/errors/http_404"] == 1  # errors counted by kind
    j.close()


def test_timeout(stub):
    j = make(stub, shuffle=False, timeout=0.3, max_retries=1)
    t0 = time.monotonic()
    vs = j.judge(["slow", "say:1"], [("a", "b")] * 2)
    assert time.monotonic() - t0 < 1.9  # two 0.3 s attempts, not the 2 s answer
    assert vs[0].invalid and "timed out" in vs[0].raw["error"].lower()
    assert vs[1].winner == 1
    assert j.last_metrics["judge/http_errors"] == 1 and j.last_metrics["judge/http_retries"] == 1
    assert j.last_metrics["judge/errors/timeout"] == 1
    j.close()


@pytest.mark.parametrize("prompt, needle", [("badjson", "bad JSON"), ("nochoices", "no choices[0].message.content")])
def test_bad_replies(stub, prompt, needle):
    j = make(stub, shuffle=False)
    v = j.judge([prompt], [("a", "b")])[0]
    assert v.invalid and needle in v.raw["error"]
    assert j.last_metrics["judge/http_errors"] == 1 and j.last_metrics["judge/errors/bad_reply"] == 1
    j.close()


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_connection_refused():
    j = make(f"http://127.0.0.1:{_closed_port()}", shuffle=False, max_retries=1, timeout=2)
    t0 = time.monotonic()
    vs = j.judge(["say:1", "say:0"], [("a", "b")] * 2)
    assert time.monotonic() - t0 < 5
    assert all(v.invalid for v in vs)
    assert j.last_metrics == {
        "judge/http_errors": 2,
        "judge/unparsed": 0,
        "judge/errors/connection_refused": 2,
        "judge/http_retries": 2,
        "judge/swapped": 0,
    }
    j.close()


def test_api_key_from_environment(stub, monkeypatch, registry):
    monkeypatch.setenv("XPO_TEST_JUDGE_KEY", "s3cret-value")
    ctx = JudgeContext(judge_config={"api_key_env": "XPO_TEST_JUDGE_KEY", "shuffle": False})
    j = build_judge(stub.url, ctx, registry)
    j.judge(["say:1"], [("a", "b")])
    assert stub.requests[0]["auth"] == "Bearer s3cret-value"
    j.close()


# ---------------------------------------------------------------------------------------------
# configuration


@pytest.mark.parametrize(
    "url, want",
    [
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080/v1/chat/completions"),
        ("http://127.0.0.1:8080/", "http://127.0.0.1:8080/v1/chat/completions"),
        ("http://127.0.0.1:8080/v1", "http://127.0.0.1:8080/v1/chat/completions"),
        ("http://127.0.0.1:8080/v1/", "http://127.0.0.1:8080/v1/chat/completions"),
        ("https://h/api/v1/chat/completions", "https://h/api/v1/chat/completions"),
        ("http://localhost:11434/v1/chat/completions/", "http://localhost:11434/v1/chat/completions"),
    ],
)
def test_normalise_url(url, want):
    assert normalise_url(url) == want


@pytest.mark.parametrize(
    "spec, cfg, needle",
    [
        ("http://", {}, "needs a URL like"),
        ("http://127.0.0.1:99999", {}, "port"),
        ("http://127.0.0.1:8080", {"concurency": 2}, "did you mean 'concurrency'"),
        ("http://127.0.0.1:8080", {"api_key": "sk-123"}, "did you mean 'api_key_env'"),
        ("http://127.0.0.1:8080", {"timeout": -1}, "judge_config.timeout: -1 is not valid"),
        ("http://127.0.0.1:8080", {"max_retries": 1.5}, "expected an integer"),
        ("http://127.0.0.1:8080", {"model": 3}, "expected a string"),
        ("http://127.0.0.1:8080", {"api_key_env": "XPO_SURELY_UNSET_VAR_123"}, "is not set"),
    ],
)
def test_check_errors(spec, cfg, needle, registry):
    with pytest.raises(ConfigError) as e:
        check_judge(spec, JudgeContext(judge_config=cfg), registry)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_key_given_as_api_key_env_is_not_echoed(registry):
    key = "sk-proj-abcdefghijklmnop123456"
    with pytest.raises(ConfigError) as e:
        check_judge("http://127.0.0.1:8080", JudgeContext(judge_config={"api_key_env": key}), registry)
    assert key not in str(e.value) and "never the key itself" in str(e.value)


# ---------------------------------------------------------------------------------------------
# a real mlx_lm server serving the tiny random model


@pytest.fixture(scope="module")
def mlx_server(tiny_model_path):
    port = _closed_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlx_lm",
            "server",
            "--model",
            tiny_model_path,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "WARNING",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + 60
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlx_lm server exited: {proc.stderr.read().decode()[-2000:]}")
            try:
                with opener.open(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("mlx_lm server not ready within 60 s")
            time.sleep(0.25)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_real_mlx_lm_server(mlx_server, registry):
    ctx = JudgeContext(judge_config={"max_tokens": 6, "concurrency": 2, "timeout": 60}, seed=1)
    j = build_judge(mlx_server, ctx, registry)
    prompts = [
        "Say something cheerful about the sea!",
        "Describe snow in one line.",
        "Tell me a fact about bread.",
        "What do you like about clocks?",
    ]
    pairs = [
        ("Yes! What a lovely day!", "No."),
        ("Cold.", "Snow is soft and white."),
        ("Bread is made of flour.", "I like it."),
        ("Tick tock!", "They are kind."),
    ]
    vs = j.judge(prompts, pairs)
    assert j.last_metrics["judge/http_errors"] == 0
    valid = 0
    for v, f in zip(vs, j.last_flips):
        assert isinstance(v.raw, str)  # an answer came back for every pair
        w = parse_answer(v.raw)
        if w is None:
            assert v.invalid  # the random model's garbage is never a label
        else:
            assert v.winner == (1 - w if f else w)
            valid += 1
    assert j.last_metrics["judge/unparsed"] == len(pairs) - valid
    # the tiny random model does not answer with a digit: every verdict is invalid
    assert valid == 0 and all(v.invalid for v in vs)
    j.close()

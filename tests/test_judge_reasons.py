"""A failing judge says why, in the line the user reads: an invalid answer's kind with the answer
quoted (``2 invalid: unparsed answer "I think..."``), and a raising judge counted one way (errors by
exception class) in a training step, a validation and ``mlx-xpo eval``."""

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from test_cli_e2e import base_cfg, rows, run, small_data, write_cfg
from test_judges_http import Stub

from mlx_xpo_plugin.contracts import Verdict
from mlx_xpo_plugin.judges.common import combine_orders
from mlx_xpo_plugin.judges.function import FunctionJudge, answer_to_verdict
from mlx_xpo_plugin.judges.http import HTTPJudge
from mlx_xpo_plugin.judges.parse import quote
from mlx_xpo_plugin.loop.faults import invalid_example
from mlx_xpo_plugin.loop.win_rate import describe, errors_text

PROSE = "I think the first answer is more helpful, because it explains the idea step by step."
QUOTED = '"I think the first answer is more helpful..."'  # the first 40 characters


# ---------------------------------------------------------------------------------------------
# each judge's reason


def test_quote_cuts_long_answers_and_keeps_short_ones_whole():
    assert quote(PROSE) == QUOTED
    assert quote("  two\n words ") == '"two words"'


def test_an_endpoint_answering_prose_gives_an_unparsed_answer_quoted():
    stub = Stub()
    try:
        vs = HTTPJudge(stub.url, backoff=0.01, shuffle=False).judge([f"say:{PROSE}", "say:1"], [("a", "b")] * 2)
    finally:
        stub.close()
    assert vs[0].invalid and vs[0].raw == PROSE  # the raw answer is kept whole
    assert vs[0].reason == f"unparsed answer {QUOTED}"
    assert vs[1].winner == 1 and vs[1].reason is None


@pytest.mark.parametrize(
    "answer, reason",
    [
        (2, "answer 2 (not 0, 1, None or a probability in [0, 1])"),
        ("2", 'answer "2" (not 0, 1, None or a probability in [0, 1])'),
        (True, "answer True (not 0, 1, None or a probability in [0, 1])"),
        (1.5, "answer 1.5 (not 0, 1, None or a probability in [0, 1])"),
    ],
)
def test_a_function_answer_outside_the_contract_is_quoted(answer, reason):
    v = answer_to_verdict(answer)
    assert v.invalid and v.raw is answer and v.reason == reason


def test_a_raising_function_is_an_error_not_an_answer():
    def boom(prompt, a, b):
        raise RuntimeError("judge backend down")

    j = FunctionJudge(boom)
    vs = j.judge(["p"], [("a", "b")])
    assert vs[0].invalid and vs[0].reason is None and j.last_metrics == {"judge/errors/RuntimeError": 1}
    assert invalid_example(vs, failed=1) is None  # never shown as an answer


def test_both_orders_keep_the_invalid_sides_reason_and_name_a_disagreement():
    bad = Verdict.bad("maybe", 'unparsed answer "maybe"')
    v, _ = combine_orders(Verdict(0, None, "0"), bad)
    assert v.invalid and v.reason == 'unparsed answer "maybe"'
    v, flag = combine_orders(Verdict(0, None, "0"), Verdict(0, None, "0"))  # (b, a) gave 0: b is better
    assert flag is False and v.reason == "orders disagree: (a, b) gave winner 0, (b, a) gave winner 1"


def test_a_plugin_judge_without_reasons_is_quoted_by_its_raw_answer():
    vs = [Verdict(0), Verdict.bad({"label": "C"})]
    assert invalid_example(vs, failed=0) == "answer \"{'label': 'C'}\""
    assert invalid_example(vs, failed=1) is None  # may be an error's text: not shown as an answer


# ---------------------------------------------------------------------------------------------
# the words


def test_describe_shows_invalid_answers_and_errors_apart():
    res = {"wins": 1, "losses": 1, "ties": 0, "invalid": 5, "errors/RuntimeError": 3}
    res.update(invalid_example=f"unparsed answer {QUOTED}", last_error="RuntimeError: down")
    assert describe(res) == (
        f"0.50 (95% CI 0.09-0.91; 1 won, 1 lost, 0 ties, 2 invalid: unparsed answer {QUOTED}, "
        "3 errors: RuntimeError: down)"
    )
    val = {"val_wins": 0, "val_losses": 0, "val_ties": 2, "val_invalid": 0}
    assert describe(val, prefix="val_") == "no decided pair (0 won, 0 lost, 2 ties, 0 invalid)"


def test_errors_of_several_kinds_are_counted_by_kind():
    assert errors_text(3, {"RuntimeError": 2, "ValueError": 1}, "ValueError: x") == (
        "3 errors (2 RuntimeError, 1 ValueError; last: ValueError: x)"
    )
    assert errors_text(1, {"timeout": 1}, None) == "1 error (timeout)"
    assert errors_text(0, {}, "x") == ""


# ---------------------------------------------------------------------------------------------
# runs: the line the user reads


def prose_endpoint():
    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            body = json.dumps({"choices": [{"message": {"role": "assistant", "content": PROSE}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), H)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server


def test_an_endpoint_judge_answering_prose_ends_non_zero_with_its_answer_quoted(tiny_model_path, tmp_path):
    server = prose_endpoint()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        kw = dict(judge=url, judge_config={"max_retries": 0}, max_judgeless_steps=2, iters=4)
        cfg = write_cfg(tmp_path, **base_cfg(tiny_model_path, small_data(tmp_path), tmp_path / "ad", **kw))
        r = run(["--train-mode", "xpo", "--config", cfg])
    finally:
        server.shutdown()
        server.server_close()
    assert r.returncode == 3, (r.stdout[-2000:], r.stderr[-2000:])
    out = r.stdout
    assert f"step 1: no valid pair (2 invalid: unparsed answer {QUOTED}, 0 ties): no update" in out
    assert f"no decided pair (0 won, 0 lost, 0 ties, 4 invalid: unparsed answer {QUOTED})" in out  # step 0
    stop = [l for l in out.splitlines() if l.startswith("stopped at step 2 of 4")]
    assert len(stop) == 1, out[-3000:]
    assert f"4 pairs, 0 errors, 4 invalid answers (last: unparsed answer {QUOTED}), 0 ties" in stop[0]


def test_a_function_judge_returning_a_string_ends_non_zero_with_its_answer_quoted(tiny_model_path, tmp_path):
    judge = tmp_path / "judge_two.py"
    judge.write_text("def judge(prompt, a, b):\n    return '2'\n")
    kw = dict(judge=f"{judge}:judge", steps_per_eval=100)
    cfg = write_cfg(tmp_path, **base_cfg(tiny_model_path, small_data(tmp_path), tmp_path / "ad", **kw))
    r = run(["--train-mode", "online_dpo", "--config", cfg])
    assert r.returncode == 3, (r.stdout[-2000:], r.stderr[-2000:])
    why = 'answer "2" (not 0, 1, None or a probability in [0, 1])'
    assert f"step 1: no valid pair (2 invalid: {why}, 0 ties): no update" in r.stdout
    assert "no step of this run made an update (4 of 4 steps without a valid pair)" in r.stderr
    assert r.stderr.rstrip().endswith(f"are untrained; the judge's last invalid answer: {why}")


RAISING = """
def judge(prompt, a, b):
    if "valid" in prompt or prompt in ("Say train 1!", "Say test 1!"):
        raise RuntimeError("judge backend down")
    return 0 if (a.count("e"), len(a)) >= (b.count("e"), len(b)) else 1
"""


def test_a_raising_judge_is_counted_the_same_in_training_validation_and_eval(tiny_model_path, tmp_path):
    judge = tmp_path / "judge_raising.py"
    judge.write_text(RAISING)
    out, spec = tmp_path / "ad", f"{judge}:judge"
    cfg = write_cfg(tmp_path, **base_cfg(tiny_model_path, small_data(tmp_path), out, judge=spec, steps_per_report=1))
    r = run(["--train-mode", "xpo", "--config", cfg])
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-2000:])
    line = "1 error: RuntimeError: judge backend down"
    # training: a step with "Say train 1!" (one of its 2 pairs), by class in metrics.jsonl
    assert f"the judge failed on 1 of 2 pairs ({line})" in r.stdout
    train = [x for x in rows(out) if "judge/pairs" in x]
    assert sum(x.get("judge/errors/RuntimeError", 0) for x in train) == 2  # one epoch of 2 steps, twice
    # validation: every pair fails, and is an error, not an invalid answer
    assert (
        "step 0 (untrained baseline): validation win-rate vs reference no decided pair "
        "(0 won, 0 lost, 0 ties, 0 invalid, 4 errors: RuntimeError: judge backend down)" in r.stdout
    )
    val = [x for x in rows(out) if "val_wins" in x]
    assert val and all(x["val_errors/RuntimeError"] == x["val_invalid"] == 4 for x in val)
    # eval: one of the 4 test pairs fails
    mlx_xpo = str(Path(sys.executable).with_name("mlx-xpo"))
    e = subprocess.run([mlx_xpo, "eval", "--adapter-path", str(out)], capture_output=True, text=True, timeout=180)
    assert e.returncode == 0, e.stderr[-2000:]
    assert f"0 invalid, {line})" in e.stdout
    res = json.loads((out / "test_metrics.json").read_text())
    assert res["errors/RuntimeError"] == res["invalid"] == 1 and res["pairs"] == 4
    assert res["last_error"] == "RuntimeError: judge backend down"

"""A hub model id downloads on first use as mlx-lm downloads it, from a hub on 127.0.0.1 that
these tests serve (tests/fake_hub.py) into an HF_HOME of their own; nothing goes beyond the
loopback. Each command runs as a user runs it, with HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE."""

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from fake_hub import FakeHub
from test_cli_e2e import TRAIN, base_cfg, rows, small_data, write_cfg

MODEL, JUDGE, LARGE, GATED = "xpo-test/tiny", "xpo-test/tiny-judge", "xpo-test/large", "xpo-test/gated"
MLX_XPO = str(Path(sys.executable).with_name("mlx-xpo"))
MIB = 1024 * 1024
RESOLVE = """
import sys
from mlx_xpo_plugin.compute.models import model_folder
from mlx_xpo_plugin.errors import ConfigError
try:
    print(model_folder("model", sys.argv[1]))
except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
"""


def hub_env(url: str, home: Path, **extra) -> dict:
    """The environment of a user whose HF_ENDPOINT is ``url`` and HF_HOME ``home`` (no token)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_", "TRANSFORMERS_"))}
    return {**env, "HF_ENDPOINT": url, "HF_HOME": str(home), "HF_HUB_OFFLINE": "0", **extra}


def cli(args, env, timeout=240):
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)


def resolve(repo_id: str, env):
    return cli([sys.executable, "-c", RESOLVE, repo_id], env, timeout=120)


def one_error_line(r) -> str:
    assert "Traceback" not in r.stderr + r.stdout, r.stderr[-3000:]
    errs = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errs) == 1, r.stderr[-3000:]
    return errs[0]


def dead_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # closed again: nothing listens there


@pytest.fixture(scope="module")
def hub(tiny_model_path, tmp_path_factory):
    large = tmp_path_factory.mktemp("large-repo")
    for f in Path(tiny_model_path).iterdir():
        shutil.copy(f, large / f.name)
    # over huggingface_hub's 10 MiB download chunk, so that a cut download resumes mid-file
    (large / "notes.txt").write_bytes(bytes(range(256)) * (12 * MIB // 256))
    with FakeHub({MODEL: tiny_model_path, JUDGE: tiny_model_path, LARGE: str(large)}, gated=(GATED,)) as h:
        yield h


@pytest.fixture(scope="module")
def first_run(hub, tmp_path_factory):
    """A 2-step XPO run with the model and a model judge given as hub ids, from an empty cache."""
    tmp = tmp_path_factory.mktemp("first")
    home, out = tmp / "hf", tmp / "ad"
    kw = dict(judge=JUDGE, iters=2, steps_per_report=1, steps_per_eval=2, val_batches=1)
    cfg = write_cfg(tmp, **base_cfg(MODEL, small_data(tmp), out, **kw))
    seen = len(hub.requests)
    r = cli([TRAIN, "--train-mode", "xpo", "--config", cfg], hub_env(hub.url, home))
    return r, out, home, cfg, hub.requests[seen:]


def test_first_use_downloads_the_model_and_the_model_judge(first_run, tiny_model_path):
    r, out, home, _, requests = first_run
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Fetching 5 files" in r.stderr  # huggingface_hub's own progress bar
    gets = sorted(p.rsplit("/", 1)[1] for m, p, _ in requests if m == "GET" and "/resolve/" in p)
    files = sorted(f.name for f in Path(tiny_model_path).iterdir())
    assert gets == sorted(files * 2)  # every file of both repos, once
    for repo in (MODEL, JUDGE):
        snap = home / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / FakeHub.commit(repo)
        assert sorted(f.name for f in snap.iterdir()) == files
    assert json.load(open(out / "adapter_config.json"))["model"] == MODEL  # as mlx_lm.generate --model takes it
    assert max(x["step"] for x in rows(out)) == 2


def test_eval_with_hub_ids_uses_the_cache(hub, first_run):
    _, out, home, _, _ = first_run
    seen = len(hub.requests)
    r = cli([MLX_XPO, "eval", "--adapter-path", str(out), "--json"], hub_env(hub.url, home))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert res["wins"] + res["losses"] + res["ties"] + res["invalid"] == 4  # small_data's test.jsonl
    asked = [p for _, p, _ in hub.requests[seen:]]
    assert not [p for p in asked if "/resolve/" in p]  # no file fetched, not even its metadata
    assert sorted(p for p in asked if "/api/models/" in p) == [f"/api/models/{JUDGE}/revision/main"] + [
        f"/api/models/{MODEL}/revision/main"
    ]  # once per repo, though each is resolved in the checks and again where it loads


def test_offline_trains_from_the_cache(hub, first_run, tmp_path):
    _, _, home, cfg, _ = first_run
    seen = len(hub.requests)
    out = tmp_path / "offline"
    r = cli(
        [TRAIN, "--train-mode", "online_dpo", "--config", cfg, "--adapter-path", str(out)],
        hub_env(hub.url, home, HF_HUB_OFFLINE="1"),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert hub.requests[seen:] == []
    assert (out / "adapters.safetensors").is_file()


@pytest.mark.parametrize("case", ["missing repo", "gated judge", "unreachable hub", "offline, not cached"])
def test_a_model_that_cannot_be_had_is_one_line_exit_2_and_nothing_written(hub, tmp_path, case):
    model, judge, endpoint, offline = MODEL, "mlx_xpo_plugin.rules:prefer_letter_e", hub.url, "0"
    if case == "missing repo":
        model = "xpo-test/missing"
    elif case == "gated judge":
        judge = GATED
    elif case == "unreachable hub":
        endpoint = dead_port_url()
    else:
        offline = "1"
    out = tmp_path / "ad"
    cfg = write_cfg(tmp_path, **base_cfg(model, small_data(tmp_path), out, judge=judge))
    env = hub_env(endpoint, tmp_path / "hf", HF_HUB_OFFLINE=offline)
    r = cli([TRAIN, "--train-mode", "xpo", "--config", cfg], env, timeout=120)
    assert r.returncode == 2, r.stderr[-3000:]
    line = one_error_line(r)
    assert not out.exists() and "Loading" not in r.stdout
    cache = tmp_path / "hf" / "hub"
    expected = {
        "missing repo": f"error: model: 'xpo-test/missing': no such local folder, and no model of that id on "
        f"the hub at {hub.url} (check the id; for a private model, set HF_TOKEN or run `hf auth login`)",
        "gated judge": f"error: judge: '{GATED}': a gated model on the hub at {hub.url}, and no token is set, so "
        f"no access (accept its conditions on {hub.url}/{GATED}, then set HF_TOKEN or run `hf auth login`)",
        "unreachable hub": f"error: model: '{MODEL}': the hub at {endpoint} cannot be reached (ConnectError: ",
        "offline, not cached": f"error: model: '{MODEL}': HF_HUB_OFFLINE is set, and the model is not "
        f"(completely) in the Hugging Face cache {cache} (a run with HF_HUB_OFFLINE unset downloads it, "
        f"as does `hf download {MODEL}`)",
    }[case]
    assert line.startswith(expected), line
    if case == "unreachable hub":
        assert line.endswith(
            f"in the Hugging Face cache {cache} (check the network and HF_ENDPOINT; "
            "HF_HUB_OFFLINE=1 runs from the cache alone)"
        ), line


def test_eval_with_a_missing_judge_repo_is_one_line_and_writes_nothing(hub, first_run):
    _, out, home, _, _ = first_run
    before = sorted(p.name for p in out.iterdir())
    r = cli([MLX_XPO, "eval", "--adapter-path", str(out), "--judge", "xpo-test/no-judge"], hub_env(hub.url, home))
    assert r.returncode == 2
    assert one_error_line(r).startswith("error: judge: 'xpo-test/no-judge': no such local folder, and no model")
    assert sorted(p.name for p in out.iterdir()) == before


def test_a_download_cut_short_resumes_from_where_it_stopped(hub, tmp_path):
    hub.cut_once.add("notes.txt")
    seen = len(hub.requests)
    r = resolve(LARGE, hub_env(hub.url, tmp_path / "hf"))
    assert r.returncode == 0, r.stderr[-3000:]
    notes = [rng for m, p, rng in hub.requests[seen:] if m == "GET" and p.endswith("/notes.txt")]
    assert notes == [None, f"bytes={10 * MIB}-"]  # the second request asks for the rest only
    got = (Path(r.stdout.strip()) / "notes.txt").read_bytes()
    assert got == (hub.repos[LARGE] / "notes.txt").read_bytes()


def test_a_failed_download_continues_on_the_next_start_with_what_is_missing(hub, tmp_path):
    env = hub_env(hub.url, tmp_path / "hf")
    hub.fail_once.add("model.safetensors")
    r = resolve(MODEL, env)
    assert r.returncode == 2
    line = one_error_line(r)
    assert line.startswith(f"error: model: '{MODEL}': the hub at {hub.url} answered HTTP 500 (run again later;")
    seen = len(hub.requests)
    r = resolve(MODEL, env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [p.rsplit("/", 1)[1] for p in hub.file_gets(seen)] == ["model.safetensors"]  # the rest was kept


ESTIMATE = """
import sys
from mlx_xpo_plugin.commands import calibration, cli, estimate
calibration.rates = lambda *a, **k: (estimate.SLOW, {})  # this machine's rates are not what is tested
sys.exit(cli.main(["estimate", "--config", sys.argv[1], "--json"]))
"""


def test_estimate_fetches_the_config_and_tokenizer_not_the_weights(hub, tmp_path):
    cfg = write_cfg(tmp_path, **base_cfg(MODEL, small_data(tmp_path), tmp_path / "ad", judge=JUDGE))
    seen = len(hub.requests)
    r = cli([sys.executable, "-c", ESTIMATE, cfg], hub_env(hub.url, tmp_path / "hf"), timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["judge_kind"] == "llm"
    fetched = sorted(p.split("/resolve/")[0] + ":" + p.rsplit("/", 1)[1] for p in hub.file_gets(seen))
    files = ["chat_template.jinja", "config.json", "tokenizer.json", "tokenizer_config.json"]
    assert fetched == sorted(f"/{repo}:{f}" for repo in (MODEL, JUDGE) for f in files)


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_a_setting_refused_without_a_model_is_refused_before_anything_downloads(hub, tmp_path):
    """The cheap checks come first: a wandb project without the wandb package is named before the
    model and the judge would download."""
    kw = dict(judge=JUDGE, iters=2, wandb="my-project")
    cfg = write_cfg(tmp_path, **base_cfg(MODEL, small_data(tmp_path), tmp_path / "ad", **kw))
    seen = len(hub.requests)
    r = cli([TRAIN, "--train-mode", "xpo", "--config", cfg], hub_env(hub.url, tmp_path / "hf"))
    assert r.returncode == 2, r.stderr[-3000:]
    assert "wandb" in one_error_line(r)
    assert hub.requests[seen:] == []
    assert not (tmp_path / "ad").exists()

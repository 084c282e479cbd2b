"""A model id on the Hugging Face hub, made a local folder as ``mlx_lm.load`` makes it.

mlx-lm downloads a hub id with huggingface_hub's ``snapshot_download`` and its own file patterns
(``mlx_lm.utils.DEFAULT_ALLOW_PATTERNS``: configs, tokenizer files, ``model*.safetensors``); so does
:func:`download`, before a run writes anything, and the run loads from the folder it returns.
huggingface_hub does the rest as for any of its users: its progress bars, the cache (``HF_HOME``,
``HF_HUB_CACHE``), ``HF_TOKEN``, ``HF_ENDPOINT``, ``HF_HUB_OFFLINE`` (the cache only), a file lock
per file for processes sharing a cache, and every file finished before an interruption is kept for
the next start. Each failure it raises becomes one :class:`ModelUnavailable` line naming the
setting and the id.
"""

from __future__ import annotations

from mlx_xpo_plugin.errors import ConfigError

#: Folders already resolved in this process: (repo id, with weights, cache, endpoint) -> folder.
#: A run resolves each id in its checks and again where it loads; the hub is asked once.
RESOLVED: dict[tuple, str] = {}


class ModelUnavailable(ConfigError):
    """A model id that cannot be had now (not on the hub, no access, no network, offline and not
    cached, a download that failed): the id may be right, so the line does not call it invalid."""

    def __init__(self, setting: str, repo_id: str, why: str, hint: str):
        super().__init__(setting, repo_id, why, hint)
        self.args = (f"{setting}: {repo_id!r}: {why} ({hint})",)


def download(setting: str, repo_id: str, weights: bool = True) -> str:
    """The local snapshot folder of ``repo_id``, downloaded into the Hugging Face cache where it is
    not there yet; without ``weights`` only its configs and tokenizer (what ``mlx_lm.load_tokenizer``
    fetches). ModelUnavailable (one line) when it cannot be had."""
    from huggingface_hub import constants, snapshot_download

    # mlx_lm.utils imports mlx: only when a hub id is resolved
    from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS

    where = (constants.HF_HUB_CACHE, constants.ENDPOINT)
    for key in ((repo_id, True, *where), (repo_id, weights, *where)):
        if key in RESOLVED:
            return RESOLVED[key]
    patterns = [p for p in DEFAULT_ALLOW_PATTERNS if weights or not p.endswith(".safetensors")]
    try:
        folder = snapshot_download(repo_id, allow_patterns=patterns)
    except Exception as e:  # every failure of the download becomes one line (see failure)
        raise failure(setting, repo_id, e) from e
    RESOLVED[(repo_id, weights, *where)] = folder
    return folder


def failure(setting: str, repo_id: str, e: Exception) -> ModelUnavailable:
    """The one line for an exception of ``snapshot_download``: what went wrong, and what to do."""
    from huggingface_hub import constants, get_token
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    hub, cache = f"the hub at {constants.ENDPOINT}", constants.HF_HUB_CACHE
    login = "set HF_TOKEN or run `hf auth login`"
    kept = f"files already downloaded are kept in {cache}"
    cause = e.__cause__ if isinstance(e, LocalEntryNotFoundError) and e.__cause__ is not None else e
    if isinstance(e, GatedRepoError):
        return ModelUnavailable(
            setting,
            repo_id,
            f"a gated model on {hub}, and {'the token set has' if get_token() else 'no token is set, so'} no access",
            f"accept its conditions on {constants.ENDPOINT}/{repo_id}, then {login}",
        )
    if isinstance(e, RepositoryNotFoundError):
        return ModelUnavailable(
            setting,
            repo_id,
            f"no such local folder, and no model of that id on {hub}",
            "check the id" + ("" if get_token() else f"; for a private model, {login}"),
        )
    if isinstance(e, HFValidationError):
        return ModelUnavailable(
            setting, repo_id, "no such local folder, nor a valid hub model id", str(e).split("\n")[0]
        )
    if isinstance(cause, OfflineModeIsEnabled) or (
        isinstance(e, LocalEntryNotFoundError) and constants.is_offline_mode()
    ):
        return ModelUnavailable(
            setting,
            repo_id,
            f"HF_HUB_OFFLINE is set, and the model is not (completely) in the Hugging Face cache {cache}",
            f"a run with HF_HUB_OFFLINE unset downloads it, as does `hf download {repo_id}`",
        )
    if isinstance(cause, HfHubHTTPError) and getattr(cause, "response", None) is not None:
        status = cause.response.status_code
        return ModelUnavailable(
            setting,
            repo_id,
            f"{hub} answered HTTP {status}",
            f"check your token: {login}" if status in (401, 403) else f"run again later; {kept}",
        )
    if isinstance(e, LocalEntryNotFoundError):
        return ModelUnavailable(
            setting,
            repo_id,
            f"{hub} cannot be reached ({first_line(cause)}), and the model is not (completely) in the Hugging "
            f"Face cache {cache}",
            "check the network and HF_ENDPOINT; HF_HUB_OFFLINE=1 runs from the cache alone",
        )
    return ModelUnavailable(
        setting, repo_id, f"downloading it from {hub} failed ({first_line(cause)})", f"run again to continue; {kept}"
    )


def first_line(e: BaseException) -> str:
    text = str(e).strip().split("\n")[0]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__

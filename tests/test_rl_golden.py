"""Pinned behaviour of the RL loop: fixed-seed 3-step runs must log the metrics recorded in
tests/data/rl_golden.json (timings aside), so a refactor cannot change what a run does.

    python -m pytest -q tests/test_rl_golden.py
    UPDATE_GOLDEN=1 python -m pytest -q tests/test_rl_golden.py   # after a change MEANT to alter runs

The runs (in this process: tests/cli.py) use a random tiny model, an untrained critic, a
pseudo-random outcome (tests/pseudo_outcome.py) and pseudo-random written states, so every
reward term, the CLIPO head and the policy update all act.
"""
import json
import os
import zlib

import pytest
import torch

import answers
import cli
import critic
import critic_data
import metrics
import pseudo_outcome
import rewards
import train
from model import TinyTokenizer, new_tiny_model, save_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "data", "rl_golden.json")
TIMING = {"time_sample", "time_reward", "time_train", "time_update", "tokens_per_s", "kept_tokens_per_s"}
RUNS = {
    "clipo+critic": ["--mode", "clipo+critic", "--clipo-warmup", "1"],
    "clipo+oracle process": ["--mode", "clipo+oracle", "--critic-credit", "process", "--clipo-warmup", "1"],
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("golden")
    save_model(new_tiny_model(seed=0), TinyTokenizer(), str(root / "model"))
    torch.manual_seed(0)
    untrained = critic.Critic()
    critic.calibrate(untrained, critic_data.calibration_rows("tiny", searches=20), "tiny")  # values that vary
    critic.save(untrained, str(root / "critic.safetensors"))
    return root


def _written_states(text):
    """A random model writes no states: a pseudo-random two-number state every 9 characters."""
    return [(i, [zlib.crc32(text[:i + 1].encode()) % 60, 7]) for i in range(4, len(text), 9)]


def _metrics(setup, name, flags, monkeypatch):
    out = setup / name.replace(" ", "-").replace("+", "-")
    monkeypatch.setattr(answers, "extract_states", _written_states)
    monkeypatch.setattr(rewards, "legal_states", lambda lines, states: [True] * len(states))
    argv = [*flags, "--model", setup / "model", "--critic", setup / "critic.safetensors", "--out", out, "--steps", 3,
            "--prompts-per-step", 4, "--group-size", 4, "--max-new-tokens", 40, "--eval-every", 3,
            "--eval-problems", 4, "--lr", "1e-3", "--seed", 5, "--procs", 1,
            "--format-reward", 0.1, "--agg", "token-mean", "--max-sample-rounds", 1]  # the defaults when pinned
    result = cli.run(train.main, argv, outcome=pseudo_outcome.verify)
    assert result.returncode == 0, result.stderr[-2000:]
    with open(out / "metrics.jsonl") as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def test_fixed_seed_runs_log_the_pinned_metrics(setup, monkeypatch):
    got = {name: _metrics(setup, name, flags, monkeypatch) for name, flags in RUNS.items()}
    documented = metrics.docs()
    assert not [k for rows in got.values() for row in rows for k in row if k not in documented]  # python metrics.py
    if os.environ.get("UPDATE_GOLDEN"):
        with open(GOLDEN, "w") as f:
            json.dump(got, f, indent=1)
    with open(GOLDEN) as f:
        pinned = json.load(f)
    for name, rows in pinned.items():
        assert len(got[name]) == len(rows), name
        for row, ref in zip(got[name], rows):
            assert ref.keys() <= row.keys(), (name, ref.keys() - row.keys())  # new metrics may join
            for key, value in ref.items():
                assert value == pytest.approx(row[key], rel=1e-5, abs=1e-6), (name, row["step"], key)

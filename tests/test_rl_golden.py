"""Pinned behaviour of the RL loop: fixed-seed 3-step runs must log the metrics recorded in
tests/data/rl_golden.json (timings aside), so a refactor cannot change what a run does.

    python -m pytest -q tests/test_rl_golden.py
    UPDATE_GOLDEN=1 python -m pytest -q tests/test_rl_golden.py   # after a change MEANT to alter runs

The runs use a random tiny model, an untrained critic, a pseudo-random outcome (as in
test_train.py) and pseudo-random written states, so every reward term, the CLIPO head and the
policy update all act.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import critic
from model import TinyTokenizer, new_tiny_model, save_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "data", "rl_golden.json")
TIMING = {"time_sample", "time_reward", "time_train", "time_update", "tokens_per_s"}
RUNNER = f"""
import sys, zlib
sys.path.insert(0, {ROOT!r})
import countdown, train
countdown.verify = lambda nums, target, text: zlib.crc32(text.encode()) % 3 == 0
# a random model writes no states: read a pseudo-random two-number state every 9 characters
countdown.extract_states = lambda text: [(i, [zlib.crc32(text[:i + 1].encode()) % 60, 7])
                                         for i in range(4, len(text), 9)]
if __name__ == "__main__":
    train.main(sys.argv[1:])
"""
RUNS = {
    "clipo+critic": ["--mode", "clipo+critic", "--clipo-warmup", "1"],
    "clipo+oracle process": ["--mode", "clipo+oracle", "--critic-credit", "process", "--clipo-warmup", "1"],
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("golden")
    save_model(new_tiny_model(seed=0), TinyTokenizer(), str(root / "model"))
    torch.manual_seed(0)
    critic.save(critic.Critic(), str(root / "critic.safetensors"))
    (root / "runner.py").write_text(RUNNER)
    return root


def _metrics(setup, name, flags):
    out = setup / name.replace(" ", "-").replace("+", "-")
    cmd = [sys.executable, str(setup / "runner.py"), *flags, "--model", str(setup / "model"), "--critic",
           str(setup / "critic.safetensors"), "--out", str(out), "--steps", "3", "--prompts-per-step", "4",
           "--group-size", "4", "--max-new-tokens", "40", "--eval-every", "3", "--eval-problems", "4", "--lr", "1e-3",
           "--seed", "5", "--procs", "1", "--format-reward", "0.1"]  # the default when the metrics were pinned
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    with open(out / "metrics.jsonl") as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def test_fixed_seed_runs_log_the_pinned_metrics(setup):
    got = {name: _metrics(setup, name, flags) for name, flags in RUNS.items()}
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

"""Threads on the CPU: the user's OMP_NUM_THREADS wins in every phase of train.py (rollouts,
training passes, held-out evaluation), eval.py and critic.py; without it, train.py and
critic.py use this machine's cores (shared among train.py's processes) and eval.py torch's default.
Each program runs in a fresh process whose phases are spied on: the spy records
torch.get_num_threads() whenever a phase's function is called."""
import json
import os
import subprocess
import sys

import pytest

from model import TinyTokenizer, new_tiny_model, save_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPY = f"""
import json, sys
sys.path.insert(0, {ROOT!r})
import torch
import critic, grpo, rl, train
import eval as evaluation
seen = set()

def spy(module, name):
    function = getattr(module, name)
    def wrapped(*args, **kwargs):
        seen.add(torch.get_num_threads())
        return function(*args, **kwargs)
    setattr(module, name, wrapped)
for module, name in ((rl, "sample"), (evaluation, "sample"), (grpo, "sequence_logprobs"), (critic, "fit_batch"),
                     (critic, "evaluate")):
    spy(module, name)
program, out, *argv = sys.argv[1:]
sys.argv = [program, *argv]
{{"train": lambda: train.main(argv), "eval": evaluation.main, "critic": critic.main}}[program]()
with open(out, "w") as f:
    json.dump(sorted(seen), f)
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("threads")
    save_model(new_tiny_model(seed=0), TinyTokenizer(), str(root / "model"))
    (root / "spy.py").write_text(SPY)
    return root


def _threads_seen(setup, program, omp, *argv):
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if omp:
        env["OMP_NUM_THREADS"] = omp
    out = setup / f"{program}-{omp}-{len(os.listdir(setup))}.json"
    result = subprocess.run([sys.executable, str(setup / "spy.py"), program, str(out), *argv], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(out.read_text())


def _train(setup, omp):
    """An RL step: held-out evaluation, rollouts, the old pass and the update (the warm start
    runs in the same process after the same cpu_threads call, its passes through the same
    grpo.sequence_logprobs)."""
    return set(_threads_seen(setup, "train", omp, "--mode", "grpo", "--model", str(setup / "model"), "--out",
                             str(setup / f"run-{omp}"), "--steps", "1", "--prompts-per-step", "2", "--group-size",
                             "2", "--max-new-tokens", "8", "--minibatches", "1", "--eval-problems", "2",
                             "--procs", "1"))


def _torch_default():
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    return int(subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], env=env,
                              capture_output=True, text=True, check=True).stdout)


def test_omp_num_threads_wins_in_every_phase(setup):
    assert _train(setup, "1") == {1}
    assert _threads_seen(setup, "eval", "1", "--model", str(setup / "model"), "--procedural", "2",
                         "--max-new-tokens", "8") == [1]
    assert _threads_seen(setup, "critic", "1", "--steps", "2", "--out", str(setup / "critic.safetensors")) == [1]


def test_without_it_the_documented_defaults(setup):
    cores = os.cpu_count()
    assert _train(setup, None) == {cores}  # one process: every core
    assert _threads_seen(setup, "critic", None, "--steps", "2", "--out", str(setup / "critic.safetensors")) == [cores]
    assert _threads_seen(setup, "eval", None, "--model", str(setup / "model"), "--procedural", "2",
                         "--max-new-tokens", "8") == [_torch_default()]

"""Threads on the CPU: the user's OMP_NUM_THREADS wins in every phase of train.py (rollouts,
training passes, held-out evaluation), eval.py and critic.py; without it, train.py and
critic.py use this machine's cores (shared among train.py's processes) and eval.py torch's default.
The programs run in a fresh process whose phases are spied on: the spy records
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
import critic, forward, rl, train
import eval as evaluation
seen = set()

def spy(module, name):
    function = getattr(module, name)
    def wrapped(*args, **kwargs):
        seen.add(torch.get_num_threads())
        return function(*args, **kwargs)
    setattr(module, name, wrapped)
for module, name in ((rl, "sample"), (evaluation, "sample"), (forward, "sequence_logprobs"), (critic, "fit_batch"),
                     (critic, "evaluate")):
    spy(module, name)
out, programs = sys.argv[1], json.loads(sys.argv[2])
mains = {{"train": train.main, "eval": evaluation.main, "critic": critic.main}}
threads, fresh = {{}}, torch.get_num_threads()  # what torch chose when this process started
for program, argv in programs:  # each from a fresh process's thread count, with the threads its phases saw
    torch.set_num_threads(fresh)
    seen.clear()
    mains[program](argv)
    threads[program] = sorted(seen)
with open(out, "w") as f:
    json.dump(threads, f)
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("threads")
    save_model(new_tiny_model(seed=0), TinyTokenizer(), str(root / "model"))
    (root / "spy.py").write_text(SPY)
    return root


def _threads_seen(setup, omp):
    """{program: thread counts its phases saw} for eval.py, critic.py and train.py, run one after
    the other in one new process, each starting from the thread count torch chose at its start. The
    RL step of train.py: held-out evaluation, rollouts, the old pass and the update (the warm
    start runs in the same process after the same cpu_threads call, its passes through the same
    forward.sequence_logprobs)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if omp:
        env["OMP_NUM_THREADS"] = omp
    programs = [("eval", ["--model", str(setup / "model"), "--procedural", "2", "--max-new-tokens", "8"]),
                ("critic", ["--steps", "2", "--out", str(setup / f"critic-{omp}.safetensors")]),
                ("train", ["--mode", "grpo", "--model", str(setup / "model"), "--out", str(setup / f"run-{omp}"),
                           "--steps", "1", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "8",
                           "--minibatches", "1", "--eval-problems", "2", "--procs", "1"])]
    out = setup / f"threads-{omp}.json"
    result = subprocess.run([sys.executable, str(setup / "spy.py"), str(out), json.dumps(programs)], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(out.read_text())


def _torch_default():
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    return int(subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], env=env,
                              capture_output=True, text=True, check=True).stdout)


def test_omp_num_threads_wins_in_every_phase(setup):
    assert _threads_seen(setup, "1") == {"eval": [1], "critic": [1], "train": [1]}


def test_without_it_the_documented_defaults(setup):
    cores = os.cpu_count()  # one process: every core
    assert _threads_seen(setup, None) == {"eval": [_torch_default()], "critic": [cores], "train": [cores]}

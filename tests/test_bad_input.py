"""The files and flags people get wrong, each one clear line (or a recovery that says what it
did), never a traceback or a silently different run: resuming with other flags, damaged
checkpoints, critic files, an unwritable --out, a metrics log cut mid-line."""
import json
import os

import pytest
import torch

import checkpoint
import cli
import critic
import eval as evaluation
import train
from model import TinyTokenizer, new_tiny_model, save_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    save_model(new_tiny_model(seed=0), TinyTokenizer(), str(root / "model"))
    return root


def _train(setup, out, steps, *extra, mode="grpo"):
    return cli.run(train.main, ["--mode", mode, "--model", setup / "model", "--out", out, "--steps", steps,
                                "--prompts-per-step", 2, "--group-size", 2, "--max-new-tokens", 12, "--minibatches", 1,
                                "--eval-every", 100, "--eval-problems", 2, "--save-every", 1, "--procs", 1, *extra])


def _one_line_error(result, *fragments):
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and all(f in last for f in fragments), last
    return last


def _steps(out):
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_resume_with_flags_that_define_the_run_is_refused_and_changes_are_recorded(setup):
    out = setup / "resume"
    assert _train(setup, out, 2).returncode == 0
    _one_line_error(_train(setup, out, 3, "--resume", mode="clipo"), "--mode clipo", "the run's grpo")
    _one_line_error(_train(setup, out, 3, "--resume", "--seed", "7"), "--seed 7", "the run's 0")
    assert json.loads((out / "args.json").read_text())["mode"] == "grpo" and _steps(out) == [0, 1, 2]
    again = _train(setup, out, 3, "--resume", "--eval-every", "3")  # the steps and a cadence may change
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((out / "args.json").read_text())["steps"] == 2  # what steps 1-2 ran with
    history = [json.loads(line) for line in (out / "args_history.jsonl").read_text().splitlines()]
    # --log-rollouts-every, not given, keeps the run's (its default followed --eval-every when the run started)
    assert history == [{"from_step": 2, "changed": {"steps": 3, "eval_every": 3}}]


def test_a_truncated_checkpoint_is_one_line_and_resume_falls_back(setup):
    out = setup / "damaged"
    assert _train(setup, out, 3).returncode == 0
    latest = checkpoint.latest_checkpoint(str(out))
    weights = os.path.join(latest, "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    _one_line_error(_train(setup, setup / "other", 1, "--model", latest), "model.safetensors", "truncated")
    evaluated = cli.run(evaluation.main, ["--model", latest, "--procedural", 2])
    assert evaluated.returncode != 0 and "model.safetensors is truncated" in evaluated.stderr.strip().splitlines()[-1]
    resumed = _train(setup, out, 4, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "model.safetensors is truncated" in resumed.stderr and "trying the previous one" in resumed.stderr
    assert _steps(out) == [0, 1, 2, 3, 4]  # step 3 ran again from step 2's checkpoint


def test_an_unwritable_out_is_one_line_before_any_process_starts(setup, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for procs in ("1", "2"):
        _one_line_error(_train(setup, blocker / "run", 1, "--procs", procs), "--out", "cannot write there")


def test_a_partial_last_metrics_line_is_dropped_on_resume(setup):
    out = setup / "partial"
    assert _train(setup, out, 2).returncode == 0
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.1')  # killed mid-write
    resumed = _train(setup, out, 3, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "dropped a partial last line" in resumed.stderr
    assert _steps(out) == [0, 1, 2, 3]


def test_critic_files_are_checked_before_any_model_loads(setup, tmp_path):
    missing = _train(setup, tmp_path / "a", 1, "--critic", str(tmp_path / "nope.safetensors"), mode="critic")
    _one_line_error(missing, "--critic", "nope.safetensors")
    not_safetensors = tmp_path / "critic.safetensors"
    not_safetensors.write_text("not a critic")
    _one_line_error(_train(setup, tmp_path / "b", 1, "--critic", str(not_safetensors), mode="critic"), "--critic")
    for path in (tmp_path / "nope.safetensors", not_safetensors):
        _one_line_error(cli.run(critic.main, ["--eval", path]), str(path))
    torch.manual_seed(0)
    critic.save(critic.Critic(), str(tmp_path / "good.safetensors"))
    assert _train(setup, tmp_path / "c", 1, "--critic", str(tmp_path / "good.safetensors"), mode="critic").returncode == 0


def test_normalise_terms_with_the_prune_credit_is_refused(setup):
    """Every unsolved rollout holds prune's top bonus (0): normalised apart it would pay failing."""
    _one_line_error(_train(setup, setup / "prune-normalised", 2, "--normalise-terms", "--critic-credit", "prune",
                           mode="oracle"), "--normalise-terms with --critic-credit prune")


def test_bad_problem_files_are_one_line_before_any_model_loads(setup):
    """--data: a missing, empty or unparsable file, a problem outside the preset, a duplicate that
    a split could put on both sides, a preset held-out problem trained on, --heldout without a
    file or too large: each one line, and no run directory left behind."""
    import random

    from problems import PRESETS, heldout_problems, never_train_on, random_problem
    rng = random.Random(5)
    good = list({random_problem(rng, exclude=never_train_on("tiny"), **PRESETS["tiny"])
                 for _ in range(6)})
    lines = [json.dumps({"nums": list(p.nums), "target": p.target}) for p in good]
    heldout = heldout_problems(1, "tiny")[0]
    files = {"empty.jsonl": "", "broken.jsonl": "{nums", "wide.jsonl": '{"nums": [1, 2, 3, 40], "target": 20}\n',
             "twice.jsonl": "\n".join(lines + lines[:1]) + "\n", "mine.jsonl": "\n".join(lines) + "\n",
             "leak.jsonl": "\n".join(lines + [json.dumps({"nums": list(heldout.nums), "target": heldout.target})]) + "\n"}
    for name, text in files.items():
        (setup / name).write_text(text)
    cases = [(("--data", setup / "absent.jsonl"), "cannot read problems"),
             (("--data", setup / "empty.jsonl"), "holds no problems"),
             (("--data", setup / "broken.jsonl"), "not JSON or JSONL"),
             (("--data", setup / "wide.jsonl"), "does not fit --preset tiny"),
             (("--data", setup / "twice.jsonl", "--heldout", "2"), "a held-out split needs distinct problems"),
             (("--data", setup / "leak.jsonl"), "is a held-out problem of the preset"),
             (("--heldout", "2"), "--heldout splits the problems of --data"),
             (("--data", setup / "mine.jsonl", "--heldout", str(len(good))), f"--heldout {len(good)}: between 1 and")]
    for k, (flags, fragment) in enumerate(cases):
        out = setup / f"data-{k}"
        _one_line_error(_train(setup, out, 2, *flags), fragment)
        assert not out.exists()

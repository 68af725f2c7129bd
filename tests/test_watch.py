"""Watching a run: rollouts.jsonl read back by `eval.py --show`, TensorBoard scalars equal to
metrics.jsonl (also across a resume), and a missing logger package as one line before any model
loads. (tests/test_train.py checks rollouts.jsonl's rows and fields across a Ctrl-C and resume.)"""
import json
import shutil

import pytest

import cli
import eval as evaluation
import pseudo_outcome
import train
from model import TinyTokenizer, new_tiny_model, save_model


def _train(model, out, steps, *extra):
    """train.py with a pseudo-random outcome, in this process (tests/cli.py)."""
    return cli.run(train.main, ["--mode", "grpo", "--model", model, "--out", out, "--steps", steps,
                                "--prompts-per-step", 2, "--group-size", 4, "--max-new-tokens", 24, "--minibatches", 1,
                                "--eval-every", 2, "--eval-problems", 4, "--lr", "1e-3", "--seed", 3, "--procs", 1,
                                *extra], outcome=pseudo_outcome.verify)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("watch") / "model"
    save_model(new_tiny_model(seed=0), TinyTokenizer(), str(path))
    return path


def test_tensorboard_scalars_equal_metrics_and_a_resume_continues_them(model, tmp_path):
    pytest.importorskip("tensorboard", reason="--log tensorboard needs the optional tensorboard package")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "run"
    result = _train(model, out, 3, "--log", "tensorboard", "--save-every", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    # as if killed after logging step 3 and before its checkpoint: the resume restarts from step 2
    shutil.rmtree(out / "checkpoints" / "step-000003")
    (out / "latest").write_text("checkpoints/step-000002\n")
    result = _train(model, out, 3, "--log", "tensorboard", "--resume")
    assert result.returncode == 0, result.stderr[-2000:]
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = {(key, row["step"]): value for row in rows for key, value in row.items() if key != "step"}
    read = {(key, e.step): e.value for key in events.Tags()["scalars"] for e in events.Scalars(key)}
    assert read.keys() == logged.keys() and {step for _, step in read} == {0, 1, 2, 3}  # each step once
    assert all(read[k] == pytest.approx(logged[k], rel=1e-6) for k in read)  # TensorBoard keeps float32


def test_show_prints_the_newest_rollouts_and_answers_readably(model, tmp_path):
    out = tmp_path / "run"
    assert _train(model, out, 2).returncode == 0
    shown = cli.run(evaluation.main, ["--show", out])
    assert shown.returncode == 0, shown.stderr
    rows = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    group = rows[-1] if rows[-1]["kind"] == "rollouts" else rows[-2]
    assert f"step 2: rollouts of Numbers {group['nums']}, Target {group['target']}" in shown.stdout
    assert shown.stdout.count("reward ") == 4 and "step 2: greedy held-out answers" in shown.stdout
    first = group["responses"][0]["text"].strip().splitlines()[0]
    assert "    " + first in shown.stdout
    missing = cli.run(evaluation.main, ["--show", tmp_path])
    assert missing.returncode != 0 and missing.stderr.strip().startswith("error: ") and "Traceback" not in missing.stderr


def test_a_missing_logger_package_is_one_line_before_any_model_loads(tmp_path, monkeypatch):
    import checkpoint
    monkeypatch.setattr(checkpoint.importlib.util, "find_spec", lambda name: None)
    args = train.parse_args(["--out", str(tmp_path / "r"), "--model", "./no/such/model", "--log", "wandb"])
    with pytest.raises(SystemExit, match="^error: --log wandb needs the wandb package: pip install wandb$"):
        train.check_args(args, world=1)

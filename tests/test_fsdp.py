"""FSDP2 (`--fsdp`) on CPU with gloo, 2 processes, the same code a GPU run uses: the same losses
and updated weights as DDP, about half the parameter and optimizer bytes per rank, an exact
resume after SIGTERM, and the real-checkpoint command on a Qwen2-shaped model."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import checkpoint
from model import TinyTokenizer, new_tiny_model, save_model
from tests.qwen_like import save_qwen_like

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
TIMING = {"time_sample", "time_reward", "time_train", "time_update", "tokens_per_s", "kept_tokens_per_s"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
RUNNER = os.path.join(ROOT, "tests", "pseudo_outcome.py")  # train.py with a pseudo-random outcome
BYTES = os.path.join(ROOT, "tests", "fsdp_bytes.py")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    save_model(new_tiny_model(seed=0), TinyTokenizer(), str(root / "model"))
    return root


def _flags(setup, out, steps, *extra):
    return ["--mode", "grpo", "--model", str(setup / "model"), "--out", str(out), "--steps", str(steps),
            "--prompts-per-step", "4", "--group-size", "4", "--max-new-tokens", "40", "--minibatches", "2",
            "--micro-batch", "4", "--eval-every", "2", "--eval-problems", "4", "--lr", "1e-3", "--seed", "3", *extra]


def _run(cmd):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV, cwd=ROOT)


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def _weights(out):
    return load_file(os.path.join(checkpoint.latest_checkpoint(str(out)), "model.safetensors"))


def test_fsdp_gives_the_losses_and_weights_of_ddp(setup):
    for name, extra in (("ddp", ()), ("fsdp", ("--fsdp",))):
        result = _run(TORCHRUN + [RUNNER] + _flags(setup, setup / name, 2, *extra))
        assert result.returncode == 0, result.stderr[-3000:]
    ddp, fsdp = _metrics(setup / "ddp"), _metrics(setup / "fsdp")
    assert [r["step"] for r in fsdp] == [0, 1, 2] and ddp[1]["zero_adv_frac"] < 1
    for a, b in zip(ddp, fsdp):
        assert a.keys() == b.keys()
        for key in a:  # fp32: reduce-scatter and all-reduce sum in different orders
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
    wa, wb = _weights(setup / "ddp"), _weights(setup / "fsdp")
    start = load_file(os.path.join(setup, "model", "model.safetensors"))
    assert wa.keys() == wb.keys() and any((wa[k] - start[k]).abs().max() > 1e-4 for k in wa)
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k


def test_each_rank_holds_half_the_parameter_and_optimizer_bytes(setup):
    result = _run(TORCHRUN + [BYTES] + _flags(setup, setup / "bytes", 1, "--fsdp"))
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        params, params_total, states, states_total = map(int, (setup / "bytes" / f"bytes-{rank}.txt").read_text().split())
        assert 0.45 < params / params_total < 0.55 and 0.45 < states / states_total < 0.55, (rank, params, states)


def test_fsdp_resume_after_sigterm_is_exact(setup):
    full = _run(TORCHRUN + [RUNNER] + _flags(setup, setup / "full", 4, "--fsdp"))
    assert full.returncode == 0, full.stderr[-3000:]
    out = setup / "stopped"
    launcher = subprocess.Popen(TORCHRUN + [RUNNER] + _flags(setup, out, 4, "--fsdp"), cwd=ROOT,
                                env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.02)
    launcher.send_signal(signal.SIGTERM)
    launcher.communicate(timeout=120)
    stopped = _metrics(out)[-1]["step"]
    assert 1 <= stopped < 4
    again = _run(TORCHRUN + [RUNNER] + _flags(setup, out, 4, "--fsdp", "--resume"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert _metrics(out) == _metrics(setup / "full")
    wa, wb = _weights(out), _weights(setup / "full")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_fsdp_bf16_checkpointed_clipo_on_a_qwen_shaped_model(qwen_tokenizer, tmp_path):
    save_qwen_like(tmp_path / "qwen")
    out = tmp_path / "run"
    # --preset tiny: test_real_checkpoints.py runs the README command with the LongProc preset
    flags = ["train.py", "--fsdp", "--mode", "clipo", "--model", str(tmp_path / "qwen"), "--prompt", "longproc",
             "--preset", "tiny", "--bf16", "--grad-checkpointing", "--out", str(out), "--prompts-per-step", "2",
             "--group-size", "4", "--micro-batch", "4", "--max-new-tokens", "32", "--minibatches", "1",
             "--clipo-warmup", "0", "--eval-problems", "2", "--eval-every", "1"]
    first = _run(TORCHRUN + flags + ["--steps", "1"])  # no warm-up: step 1 updates the sharded policy
    assert first.returncode == 0, first.stderr[-3000:]
    latest = checkpoint.latest_checkpoint(str(out))
    assert AutoModelForCausalLM.from_pretrained(latest).config.vocab_size == 151_936
    again = _run(TORCHRUN + flags + ["--steps", "2", "--resume"])
    assert again.returncode == 0, again.stderr[-3000:]
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2] and "clipo/valid_frac" in rows[-1]

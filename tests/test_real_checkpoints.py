"""The real-checkpoint path on CPU, with the same code a GPU run uses: hub names, activation
checkpointing, bf16 rollouts, resuming, stopping under torchrun, crash-safe checkpoints,
multi-node threads, and the whole `torchrun ... --mode clipo --bf16 --grad-checkpointing` run on a
random Qwen2-shaped model with the real 151,936-token vocabulary and Qwen's real tokenizer
(tests/qwen_like.py; skipped without the files)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

import checkpoint
import cli
import countdown
import distributed
import eval as evaluation
import model as models
import rl
import train
from run import build_run
from model import TinyTokenizer, new_tiny_model
from tests.qwen_like import save_qwen_like

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _build(tiny, tmp_path, *extra):
    args = train.parse_args(["--model", str(tiny / "model"), "--out", str(tmp_path / "run"), "--prompts-per-step", "2",
                             "--group-size", "2", "--max-new-tokens", "12", "--minibatches", "1", *extra])
    run, _ = build_run(args, 0, 1, torch.device("cpu"))
    return run


# 1. hub names --------------------------------------------------------------------------------

def test_hub_names_reach_transformers_and_fail_in_one_line(tmp_path):
    args = train.parse_args(["--out", str(tmp_path / "r"), "--model", "Qwen/Qwen2.5-1.5B-Instruct"])
    train.check_args(args, world=1)  # a hub name is not "a local folder without config.json"
    with pytest.raises(ValueError, match=r"^cannot load the model of Qwen/Qwen2.5-1.5B-Instruct: ") as e:
        models.load_model("Qwen/Qwen2.5-1.5B-Instruct")
    assert "\n" not in str(e.value)
    for path in ("./nothing/here", "/no/such/dir", "~/no-such-model-dir"):
        with pytest.raises(ValueError, match="no model at"):
            models.check_model_path(path)
    result = cli.run(evaluation.main, ["--model", "Qwen/Qwen2.5-1.5B-Instruct", "--procedural", 2])
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: cannot load the model of Qwen/")


# 2. activation checkpointing runs, in train mode ------------------------------------------

def _layer_forwards_in_update(run):
    """Calls of the decoder layers' MLPs during rl.update: a recomputed layer calls its MLP again
    (a pre-hook: torch stops a recompute as soon as the saved tensors it needs exist, before the
    MLP returns)."""
    r, _ = rl.roll_out(run, 0, keep=2)
    rl.old_pass(run, r, pooled=False)
    rl.score(run, r, 0)
    r.advantages = torch.randn(r.response.shape, generator=torch.Generator().manual_seed(0))
    r.loss_mask = r.response
    calls = []
    for layer in run.model.model.layers:
        layer.mlp.register_forward_pre_hook(lambda *_: calls.append(run.model.training))
    rl.update(run, r)
    return calls


def test_grad_checkpointing_recomputes_layers_in_backward(tiny, tmp_path):
    plain = _layer_forwards_in_update(_build(tiny, tmp_path))
    checkpointed = _layer_forwards_in_update(_build(tiny, tmp_path, "--grad-checkpointing"))
    assert plain and all(plain) and all(checkpointed)  # training passes run in train mode
    assert len(checkpointed) == 2 * len(plain)  # each layer's forward again during backward


# 3. logits: the prefill and the LM head ------------------------------------------------------

def test_no_forward_asks_for_every_layer_or_every_position(tiny, tmp_path):
    run = _build(tiny, tmp_path, "--mode", "clipo")
    seen = []
    run.model.lm_head.register_forward_hook(lambda m, inputs, out: seen.append(tuple(inputs[0].shape)))
    run.model.model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs.get("output_hidden_states")), with_kwargs=True)
    r, _ = rl.roll_out(run, 0, keep=1)
    # sampling: one position per row ([rows, 1, hidden] from the model's forward, [rows, hidden] from our step)
    assert seen and not [s for s in seen if isinstance(s, tuple) and len(s) == 3 and s[1] != 1]
    seen.clear()
    rl.old_pass(run, r, pooled=True)
    assert r.pooled is not None and not any(s is True for s in seen)
    heads = [s for s in seen if isinstance(s, tuple)]
    assert heads and all(s[1] <= r.ids.shape[1] - r.start for s in heads)  # response positions only


# 4. bf16 rollouts --------------------------------------------------------------------------

def test_bf16_rollouts_sample_from_a_refreshed_bf16_copy(tiny, tmp_path):
    run = _build(tiny, tmp_path, "--bf16", "--kl-coef", "0.1")
    assert run.bf16 and all(p.dtype == torch.bfloat16 for p in run.rollout_model.parameters())
    assert all(b.dtype == torch.float32 for b in run.rollout_model.buffers())  # rotary frequencies stay fp32
    assert all(p.dtype == torch.float32 for p in run.model.parameters())       # fp32 master weights
    assert next(run.ref_model.parameters()).dtype == torch.bfloat16
    keys = []
    run.rollout_model.model.layers[0].self_attn.k_proj.register_forward_hook(lambda m, i, out: keys.append(out.dtype))
    with torch.no_grad():
        for p in run.model.parameters():
            p.add_(0.01)
    rl.roll_out(run, 0, keep=1)
    assert keys and set(keys) == {torch.bfloat16}  # the KV cache is written in bf16
    for mine, copy_ in zip(run.model.parameters(), run.rollout_model.parameters()):
        assert torch.equal(copy_, mine.to(torch.bfloat16))  # refreshed before the rollouts


def test_in_training_eval_uses_the_rollout_precision(tiny, tmp_path, monkeypatch):
    run = _build(tiny, tmp_path, "--bf16")
    used = []
    monkeypatch.setattr(train, "evaluate", lambda model, *a, **k: used.append(next(model.parameters()).dtype)
                        or {"success_rate": 0.0, "solved": [0.0], "texts": [""], "failure_kinds": ["no block"],
                            "failures": dict.fromkeys(train.answers.FAILURES, 0.0), "solved_with_errors": 0.0,
                            "search": dict.fromkeys(train.answers.SEARCH_COUNTS, 0.0)})
    os.makedirs(run.args.out, exist_ok=True)
    train.heldout_success(run, [countdown.Problem((3, 4, 5, 6), 18)], 0)
    assert used == [torch.bfloat16]


# 5. resume loads to the CPU ------------------------------------------------------------------

def test_resume_state_is_loaded_to_the_cpu(tmp_path, monkeypatch):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    torch.save({"step": 3, "optimizer": {}}, folder / "trainer_state.pt")
    seen = []
    real = torch.load
    monkeypatch.setattr(checkpoint.torch, "load", lambda *a, **k: seen.append(k.get("map_location")) or real(*a, **k))
    assert checkpoint.load_state(str(folder))["step"] == 3 and seen == ["cpu"]


# 6. eval.py precision ----------------------------------------------------------------------

def test_eval_runs_bf16_weights_on_request(tiny):
    result = cli.run(evaluation.main, ["--model", tiny / "model", "--procedural", 2, "--max-new-tokens", 8, "--bf16"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "torch.bfloat16 on cpu" in result.stdout


# 7. stopping under torchrun ----------------------------------------------------------------

def test_sigterm_to_torchrun_stops_both_ranks_which_save_and_resume(tiny, tmp_path):
    out = tmp_path / "stopped"

    def flags(steps):
        return ["train.py", "--mode", "grpo", "--model", str(tiny / "model"), "--out", str(out), "--steps", str(steps),
                "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "16", "--minibatches", "1",
                "--eval-every", "100", "--eval-problems", "2"]
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 *flags(50)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    launcher.send_signal(signal.SIGTERM)
    sent = time.time()
    _, err = launcher.communicate(timeout=120)
    assert time.time() - sent < 25, err[-2000:]  # torchrun would SIGKILL them at 30 s
    assert err.count("SIGTERM: finishing this step") == 2  # both ranks stopped on their own
    stopped = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert 2 <= stopped < 50
    assert checkpoint.load_state(checkpoint.latest_checkpoint(str(out)))["step"] == stopped
    again = cli.run(train.main, [*flags(stopped + 1)[1:], "--procs", 1, "--resume"])
    assert again.returncode == 0, again.stderr[-2000:]
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == list(range(stopped + 2))


# 8. crash-safe checkpoints ------------------------------------------------------------------

class _Fault(Exception):
    pass


def test_a_failure_at_any_point_of_a_save_leaves_a_resumable_checkpoint(tmp_path, monkeypatch):
    lm, tok = new_tiny_model(seed=1), TinyTokenizer()
    optimizer = torch.optim.AdamW(lm.parameters())
    calls = {"n": 0, "fail_at": None}

    def faulty(fn):
        def wrapped(*a, **k):
            calls["n"] += 1
            if calls["n"] == calls["fail_at"]:
                raise _Fault
            return fn(*a, **k)
        return wrapped
    for module, name in [(checkpoint, "save_model"), (checkpoint.torch, "save"), (checkpoint.os, "replace"),
                         (checkpoint.shutil, "rmtree"), (checkpoint.json, "dumps")]:
        monkeypatch.setattr(module, name, faulty(getattr(module, name)))
    monkeypatch.setattr(checkpoint, "open", faulty(open), raising=False)
    points = 0
    while True:
        run_dir = str(tmp_path / f"run{points}")
        calls.update(n=0, fail_at=None)
        for step in (1, 2):
            checkpoint.save_checkpoint(run_dir, lm, tok, step, optimizer_state=optimizer.state_dict(), keep=2)
        calls.update(n=0, fail_at=points + 1)
        try:
            checkpoint.save_checkpoint(run_dir, lm, tok, 3, optimizer_state=optimizer.state_dict(), keep=2)
            failed = False
        except _Fault:
            failed = True
        calls["fail_at"] = None
        found = checkpoint.latest_checkpoint(run_dir)
        assert found is not None and checkpoint.load_state(found)["step"] in (2, 3), points
        AutoModelForCausalLM.from_pretrained(found)
        checkpoint.save_checkpoint(run_dir, lm, tok, 4, optimizer_state=optimizer.state_dict(), keep=2)  # leftovers never break the next save
        assert checkpoint.load_state(checkpoint.latest_checkpoint(run_dir))["step"] == 4
        if not failed:
            break
        points += 1
    assert points >= 6  # every call of the save was a failure point once


def test_a_run_directory_stands_for_its_latest_checkpoint(tiny, tmp_path):
    lm, tok = new_tiny_model(seed=2), TinyTokenizer()
    checkpoint.save_checkpoint(str(tmp_path), lm, tok, 7, optimizer_state={})
    assert checkpoint.resolve_model_path(str(tmp_path)).endswith("step-000007")
    assert checkpoint.resolve_model_path(str(tiny / "model")) == str(tiny / "model")


# 9. EOS lists (tests/test_qwen_tokenizer.py), 10. multi-node threads --------------------------------------------------------

def test_threads_are_shared_per_node_not_per_job(monkeypatch):
    monkeypatch.setattr(distributed.os, "cpu_count", lambda: 8)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # it wins when set
    before = torch.get_num_threads()
    try:
        distributed.cpu_threads(torch.device("cpu"))
        assert torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(before)


# the acceptance run -------------------------------------------------------------------------

PEAK = """
import resource, subprocess, sys
code = subprocess.run(sys.argv[1:]).returncode
print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.exit(code)
"""


def test_torchrun_clipo_on_a_qwen_shaped_model_with_the_real_vocabulary(qwen_tokenizer, tmp_path):
    """The command of README.md#on-8-gpus with Qwen's real tokenizer: LongProc prompts through its chat template."""
    save_qwen_like(tmp_path / "qwen")
    (tmp_path / "peak.py").write_text(PEAK)
    out = tmp_path / "run"
    flags = ["train.py", "--mode", "clipo", "--model", str(tmp_path / "qwen"), "--prompt", "longproc", "--preset",
             "longproc", "--bf16", "--grad-checkpointing", "--out", str(out), "--prompts-per-step", "2",
             "--group-size", "4", "--micro-batch", "4", "--max-new-tokens", "32", "--minibatches", "1",
             "--clipo-warmup", "0", "--eval-problems", "2", "--eval-every", "1"]
    # step 1 trains the policy and the head together (no warm-up), so the peak covers an update
    first = subprocess.run([sys.executable, str(tmp_path / "peak.py"), sys.executable, "-m", "torch.distributed.run",
                            "--standalone", "--nproc_per_node=2", *flags, "--steps", "1"],
                           cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    peak_gb = int(first.stdout.split("PEAK_RSS_KB")[-1]) / 1e6
    assert peak_gb < 4, peak_gb  # the old formulation needed 16.6 GB at this size
    latest = checkpoint.latest_checkpoint(str(out))
    loaded = AutoModelForCausalLM.from_pretrained(latest)
    assert loaded.config.vocab_size == 151_936 and checkpoint.load_state(latest)["step"] == 1
    again = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *flags,
                            "--steps", "2", "--resume"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2] and "clipo/valid_frac" in rows[-1]

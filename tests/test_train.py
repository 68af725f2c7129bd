"""train.py end to end on CPU: bad input, 2 processes = 1 process, exact resume after Ctrl-C,
and the real-model path (a transformers tokenizer with a chat template)."""
import contextlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import checkpoint
import cli
import answers
import countdown
import critic
import metrics
import problems as problem_source
import pseudo_outcome
import rewards
import train
from model import TinyTokenizer, new_tiny_model, save_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = {"time_sample", "time_reward", "time_train", "time_update", "tokens_per_s", "kept_tokens_per_s"}

RUNNER = os.path.join(ROOT, "tests", "pseudo_outcome.py")  # train.py with a pseudo-random outcome


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    save_model(new_tiny_model(seed=0), TinyTokenizer(), str(root / "model"))
    torch.manual_seed(0)
    critic.save(critic.Critic(), str(root / "critic.safetensors"))  # untrained: enough to test the plumbing
    return root


def _args(setup, out, steps, *extra, mode="grpo"):
    return [RUNNER, "--mode", mode, "--model", str(setup / "model"), "--out", str(out),
            "--steps", str(steps), "--prompts-per-step", "4", "--group-size", "4", "--max-new-tokens", "40",
            "--minibatches", "2", "--eval-every", "2", "--eval-problems", "4", "--lr", "1e-3", "--seed", "3",
            "--max-sample-rounds", "1", "--procs", "1", *extra]  # one round: refilling is per process (docs/grpo.md)


def _run(cmd, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT, **kw)


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _in_process(setup, out, steps, *extra, mode="grpo"):
    """A train.py run in this process (tests/cli.py), with the runner's pseudo-random outcome."""
    return cli.run(train.main, _args(setup, out, steps, *extra, mode=mode)[1:], outcome=pseudo_outcome.verify)


def _untimed(row):
    return {k: v for k, v in row.items() if k not in TIMING}


def _latest(out):
    return checkpoint.latest_checkpoint(str(out))


def _weights(out):
    return load_file(os.path.join(_latest(out), "model.safetensors"))


def _single(setup):
    """The 2-step single-process run that several tests compare against (run once per module)."""
    if not (setup / "single" / "metrics.jsonl").exists():
        single = _in_process(setup, setup / "single", 2)
        assert single.returncode == 0, single.stderr[-2000:]
    return setup / "single"


def test_two_processes_equal_one(setup):
    _single(setup)
    double = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
                  + _args(setup, setup / "double", 2))
    assert double.returncode == 0, double.stderr[-2000:]
    assert "Warning" not in double.stderr, double.stderr[-2000:]  # a default run prints no deprecation warnings
    spawned = _run([sys.executable] + _args(setup, setup / "spawned", 2)[:-2] + ["--procs", "2"])  # no torchrun
    assert spawned.returncode == 0, spawned.stderr[-2000:]
    a, b = _metrics(setup / "single"), _metrics(setup / "double")
    assert len(a) == len(b) == 3 and a[0]["step"] == 0  # step 0: the starting point
    assert [_untimed(r) for r in _metrics(setup / "spawned")] == [_untimed(r) for r in b]
    for row_a, row_b in zip(a, b):
        assert row_a.get("reward_mean") == row_b.get("reward_mean") and row_a.get("zero_adv_frac", 0) < 1
        for key in row_a.keys() - TIMING:
            assert abs(row_a[key] - row_b[key]) <= 1e-5, (key, row_a[key], row_b[key])
    wa, wb = _weights(setup / "single"), _weights(setup / "double")
    start = load_file(os.path.join(setup, "model", "model.safetensors"))
    assert any((wa[k] - start[k]).abs().max() > 1e-4 for k in wa)  # the weights did move
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k


@pytest.mark.parametrize("mode,extra", [
    ("grpo", ()),
    ("clipo+oracle", ("--critic-credit", "process", "--clipo-warmup", "1")),
    ("critic", ("--critic-credit", "move", "--critic-online", "--critic", "scratch")),
])
def test_ctrl_c_saves_and_resume_is_exact(setup, mode, extra):
    """For clipo, the head and its optimizer must come back too (their bonus feeds the rewards);
    for the online critic, its weights, optimizer and pool (tests/test_critic.py checks those
    on rows a random policy does not write)."""
    full = _in_process(setup, setup / f"full-{mode}", 4, *extra, mode=mode)
    assert full.returncode == 0, full.stderr[-2000:]
    out = setup / f"stopped-{mode}"
    proc = subprocess.Popen([sys.executable] + _args(setup, out, 4, *extra, mode=mode), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    warmup = 1 if "clipo" in mode else 0  # CLIPO's head warm-up rows come before step 1's
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2 + warmup):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert "Ctrl-C" in err
    stopped_at = _metrics(out)[-1]["step"]
    assert 1 <= stopped_at < 4
    state = torch.load(os.path.join(_latest(out), "trainer_state.pt"), weights_only=True)
    modules = {"clipo": {"clipo"}, "critic": {"critic"}}
    assert state["step"] == stopped_at and set(state["modules"]) == set().union(*(modules.get(m, set()) for m in mode.split("+")))
    again = _in_process(setup, out, 4, *extra, "--resume", mode=mode)
    assert again.returncode == 0, again.stderr[-2000:]
    resumed, reference = _metrics(out), _metrics(setup / f"full-{mode}")
    assert [r["step"] for r in resumed] == [0] * (1 + warmup) + [1, 2, 3, 4]
    if "clipo" in mode:
        assert all("clipo/valid_frac" in r for r in resumed[1:])
        assert [r.get("warmup_step") for r in resumed[:2]] == [None, 1]
    if mode == "critic":
        assert all("critic/auroc_3" in r for r in resumed[2::2])  # at eval steps
    for row_a, row_b in zip(resumed, reference):
        assert _untimed(row_a) == _untimed(row_b)
    wa, wb = _weights(out), _weights(setup / f"full-{mode}")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # what the policy wrote: the same lines, none twice, a group every 2 steps and answers at each evaluation
    written = (out / "rollouts.jsonl").read_text()
    assert written == (setup / f"full-{mode}" / "rollouts.jsonl").read_text()
    rows = [json.loads(line) for line in written.splitlines()]
    assert [(r["step"], r["kind"]) for r in rows] == [(0, "heldout"), (2, "heldout"), (2, "rollouts"),
                                                      (4, "heldout"), (4, "rollouts")]
    for group in (r for r in rows if r["kind"] == "rollouts"):
        assert len(group["responses"]) == 4 and group["prompt"].startswith("Numbers: ")
        for response in group["responses"]:
            assert response.keys() == {"text", "reward", "terms", "verified", "length", "failure"}
            assert response["failure"] in answers.FAILURES and set(response["terms"]) <= set(mode.split("+"))


@pytest.mark.parametrize("argv,message", [
    (["--mode", "ppo"], "unknown --mode"),
    (["--group-size", "1"], "at least 2 rollouts"),
    (["--prompts-per-step", "6", "--minibatches", "4"], "do not split into --minibatches"),
    (["--model", "./no/such/dir"], "no model at ./no/such/dir"),
    (["--resume"], "no intact checkpoint"),
    (["--critic-online"], "add critic to --mode"),
    (["--mode", "critic", "--critic", "scratch"], "needs --critic-online"),
    (["--mode", "sft", "--skip", "1"], "--skip 1.0: a probability in \\[0, 1\\)"),
    (["--mode", "sft", "--cut", "0"], "--cut 0: demonstrations need at least one token"),
])
def test_bad_input_is_one_clear_error(tmp_path, argv, message):
    args = train.parse_args(["--out", str(tmp_path / "run"), *argv])
    with pytest.raises(SystemExit, match=message):
        train.check_args(args, world=1)


def test_bad_world_division_and_existing_run(tmp_path):
    args = train.parse_args(["--out", str(tmp_path), "--prompts-per-step", "5"])
    with pytest.raises(SystemExit, match="does not divide by the 2 processes"):
        train.check_args(args, world=2)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(SystemExit, match="holds another run"):
        train.check_args(train.parse_args(["--out", str(tmp_path)]), world=1)


def _chat_tokenizer(path):
    """A character-level transformers tokenizer with a chat template, built here (no download)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    specials = ["<pad>", "<eos>", "<unk>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + [chr(c) for c in range(32, 127)] + ["\n"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(".|\n"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                  additional_special_tokens=specials[3:])
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok.save_pretrained(path)
    return len(vocab)


def test_real_model_path_with_chat_template(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
    vocab = _chat_tokenizer(tmp_path / "llm")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                                 pad_token_id=0, eos_token_id=1)).save_pretrained(tmp_path / "llm")
    out = tmp_path / "run"
    result = cli.run(train.main, ["--mode", "grpo", "--model", tmp_path / "llm", "--prompt", "longproc", "--out", out,
                                  "--steps", 1, "--prompts-per-step", 2, "--group-size", 2, "--max-new-tokens", 8,
                                  "--minibatches", 1, "--eval-problems", 2, "--procs", 1])
    assert result.returncode == 0, result.stderr[-2000:]
    row = _metrics(out)[1]
    assert row["response_length_max"] == 8 and row["success_rate"] == 0
    # the checkpoint is a plain save_pretrained directory with its tokenizer and chat template
    AutoModelForCausalLM.from_pretrained(_latest(out))
    assert AutoTokenizer.from_pretrained(_latest(out)).chat_template
    # the prompt went through the chat template: LongProc-style instruction inside the user turn
    assert json.loads((out / "args.json").read_text())["prompt"] == "longproc"


def test_micro_batches_change_nothing_but_speed(setup):
    """Gradient accumulation over length-sorted micro-batches equals one forward per minibatch."""
    for size in ("1", "64"):
        result = _in_process(setup, setup / f"micro{size}", 2, "--micro-batch", size, "--agg", "seq-mean-token-mean")
        assert result.returncode == 0, result.stderr[-2000:]
    a, b = _metrics(setup / "micro1"), _metrics(setup / "micro64")
    for row_a, row_b in zip(a, b):
        for key in row_a.keys() - TIMING:
            assert abs(row_a[key] - row_b[key]) <= 1e-5, (key, row_a[key], row_b[key])
    wa, wb = _weights(setup / "micro1"), _weights(setup / "micro64")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_a_stateful_reward_term_added_in_one_file_is_checkpointed_and_resumed_exactly(setup, monkeypatch):
    """A term written here, touching no other file: its flag reaches --help and the run, its bonus
    the rewards, its metric the docs and the logs, and its state (rollouts seen, which sets the
    bonus) the checkpoints: a run stopped at step 2 and resumed logs what an unbroken run does
    (a term whose state were not restored would restart its count and earn less)."""
    monkeypatch.setattr(rewards, "REWARD_TERMS", dict(rewards.REWARD_TERMS))  # the toy term leaves with this test

    @rewards.reward_term("toy")
    class Seen(rewards.RewardTerm):
        title, metrics = "toy", {"seen": "rollouts the term has scored, this run (its state)"}
        flags = (("--toy-coef", dict(type=float, default=0.01, help="bonus per rollout seen, on even lengths")),)

        def __init__(self, run):
            self.seen = torch.zeros(())

        def score(self, run, rollouts, step):
            self.seen += len(rollouts.tokens)
            even = torch.tensor([len(t) % 2 == 0 for t in rollouts.tokens], dtype=torch.float)
            return run.args.toy_coef * self.seen.item() * even, None, {"seen": self.seen.item()}

        def state_dict(self):
            return {"seen": self.seen.clone()}

        def load_state_dict(self, state):
            self.seen = state["seen"].clone()
    assert "toy" in train.modes() and metrics.docs()["toy/seen"].startswith("rollouts the term")
    assert "--toy-coef" in _help()
    whole = _in_process(setup, setup / "toy-whole", 4, "--toy-coef", "0.02", mode="toy")
    assert whole.returncode == 0, whole.stderr[-2000:]
    out = setup / "toy-broken"
    with monkeypatch.context() as patched:  # a Ctrl-C after step 2, as StopRequest reports one
        patched.setattr(train, "StopRequest", StopAfterTwoSteps)
        first = _in_process(setup, out, 4, "--toy-coef", "0.02", mode="toy")
    assert _metrics(out)[-1]["step"] == 2
    again = _in_process(setup, out, 4, "--toy-coef", "0.02", "--resume", mode="toy")
    assert first.returncode == 0 and again.returncode == 0, again.stderr[-2000:]
    rows = _metrics(setup / "toy-whole")
    assert [r["toy/seen"] for r in rows[1:]] == [16.0, 32.0, 48.0, 64.0]  # 4 prompts x G = 4 a step
    assert [_untimed(r) for r in _metrics(out)] == [_untimed(r) for r in rows]
    assert all(torch.equal(a, b) for a, b in zip(_weights(out).values(), _weights(setup / "toy-whole").values()))
    state = torch.load(os.path.join(_latest(out), "trainer_state.pt"), weights_only=True)
    assert state["modules"]["toy"]["seen"].item() == 64.0
    for row in rows[1:]:  # the bonus joined each rollout's reward (its spread the advantages)
        assert row["reward_mean"] > row["success_rate"]


class StopAfterTwoSteps:
    """train.StopRequest as a Ctrl-C during step 2 makes it: the loop stops after that step (the
    first question comes before step 1, after the step-0 evaluation)."""

    def __enter__(self):
        self.asked = 0
        return self

    def __exit__(self, *exc):
        return False

    def agreed(self, world):
        self.asked += 1
        return self.asked == 3


def _help():
    """train.py --help's text."""
    text = io.StringIO()
    with contextlib.redirect_stdout(text), pytest.raises(SystemExit):
        train.parse_args(["--help"])
    return text.getvalue()


def test_every_flag_has_help_and_shows_its_default():
    ap = train.parser()
    flags = [a for a in ap._actions if a.option_strings and a.dest != "help"]
    assert len(flags) >= 50
    for action in flags:
        shown = train.HelpFormatter("train.py")._get_help_string(action) if action.help else ""
        assert "default" in shown, f"{action.option_strings[0]}: its help does not show its default"
    assert "(default: 4)" in _help()  # --max-sample-rounds, as a user reads it


def test_the_metrics_page_is_rendered_from_the_one_source():
    with open(metrics.PAGE, encoding="utf-8") as f:
        page = f.read()
    assert "<!-- metrics -->" in page and metrics.render(page) == page, "run: python metrics.py --write"
    assert all(f"| `{key}` |" in page for key in metrics.docs())


def test_gmpo_with_per_token_credit_is_one_clear_error(tmp_path):
    args = train.parse_args(["--out", str(tmp_path / "r"), "--mode", "oracle", "--critic-credit", "process",
                             "--ratio", "geometric"])
    with pytest.raises(SystemExit, match="one advantage per sequence"):
        train.check_args(args, world=1)


def test_dynamic_sampling_keeps_groups_with_signal_first_in_drawn_order():
    import rl
    assert rl.choose_groups([True, False, True, False, False], 2) == [1, 3]
    assert rl.choose_groups([True, False, True, False, False], 4) == [0, 1, 3, 4]  # then the flat ones, in order
    assert rl.choose_groups([False] * 3, 3) == [0, 1, 2]


def test_oversampled_run_trains_on_fewer_flat_groups(setup):
    result = _in_process(setup, setup / "oversampled", 2, "--oversample", "1.0")
    assert result.returncode == 0, result.stderr[-2000:]
    for row in _metrics(setup / "oversampled")[1:]:
        assert row["zero_adv_frac"] <= row["sampled_flat_frac"]


COMPILED = f"""
import functools, sys
sys.path.insert(0, {os.path.join(ROOT, "tests")!r})
import torch
import pseudo_outcome  # first: it puts the project on sys.path
import countdown, train
countdown.verify = pseudo_outcome.verify
# dynamo and AOTAutograd trace the forward and backward as inductor would get them; inductor's own
# C++ code generation would add minutes on 2 cores (docs/real-checkpoints.md: the same run with inductor, by hand)
torch.compile = functools.partial(torch.compile, backend="aot_eager")
if __name__ == "__main__":
    train.main(sys.argv[1:])
"""


def test_compiled_training_forward_gives_the_eager_metrics(setup):
    """--compile with the default prompt-shared forward on the built-in Qwen2 (it once crashed:
    the forward set and deleted a layer attribute, which dynamo replays after a graph break)."""
    (setup / "compiled.py").write_text(COMPILED)
    result = _run([sys.executable, str(setup / "compiled.py")] + _args(setup, setup / "compiled", 2, "--compile")[1:])
    assert result.returncode == 0, result.stderr[-2000:]
    eager, compiled = _metrics(_single(setup)), _metrics(setup / "compiled")
    assert len(eager) == len(compiled) == 3 and eager[1]["zero_adv_frac"] < 1
    for row_a, row_b in zip(eager, compiled):
        assert row_a.keys() == row_b.keys()
        for key in row_a.keys() - TIMING:
            assert row_a[key] == pytest.approx(row_b[key], rel=1e-4, abs=1e-5), key
    wa, wb = _weights(_single(setup)), _weights(setup / "compiled")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_clipo_warms_its_head_up_before_the_policy_s_steps(setup):
    """--clipo-warmup W head-only steps run before the --steps policy updates, not inside them (the
    paper's warm-up is an epoch of 1/10 to 1/6 of training: the default is --steps / 10), and the
    policy moves from step 1 on; --normalise-terms with CLIPO is refused."""
    out = setup / "clipo-warmup"
    result = _in_process(setup, out, 2, "--clipo-warmup", "2", mode="clipo")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = _metrics(out)
    assert [(r["step"], r.get("warmup_step")) for r in rows] == [(0, None), (0, 1), (0, 2), (1, None), (2, None)]
    assert all(r["loss"] == 0 and r["kl"] == 0 and "clipo/head_loss" in r for r in rows[1:3])
    assert all(r["kl"] != 0 for r in rows[3:])  # policy updates: two, as --steps says
    assert train.parse_args(["--mode", "clipo"]).clipo_warmup == 25
    assert train.parse_args(["--mode", "grpo"]).clipo_warmup == 0
    refused = _in_process(setup, setup / "clipo-normalised", 2, "--normalise-terms", mode="clipo")
    assert refused.returncode != 0 and "--normalise-terms with clipo" in refused.stderr.strip().splitlines()[-1]


def _stop_once(real):
    """`real`, which the first time it is called first asks this process to stop (Ctrl-C)."""
    asked = []

    def stopping(*args, **kwargs):
        if not asked:
            asked.append(True)
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)
    return stopping


@pytest.mark.parametrize("during", ["the step-0 evaluation", "the warm-up"])
def test_a_stop_before_step_1_keeps_a_checkpoint_and_resumes_exactly(setup, monkeypatch, during):
    """Ctrl-C during the step-0 evaluation or CLIPO's head warm-up: the run finishes them, saves
    step 0 and says so (it raised before, leaving a directory neither a rerun nor --resume took);
    --resume then ends where an unbroken run ends, repeating neither."""
    extra = ("--clipo-warmup", "2")
    full = setup / "before-full"
    if not (full / "metrics.jsonl").exists():
        assert _in_process(setup, full, 2, *extra, mode="clipo").returncode == 0
    out = setup / f"before-{during.split()[-1]}"
    if during == "the warm-up":
        monkeypatch.setattr(train.rl, "rl_step", _stop_once(train.rl.rl_step))
    else:
        monkeypatch.setattr(train, "heldout_success", _stop_once(train.heldout_success))
    stopped = _in_process(setup, out, 2, *extra, mode="clipo")
    assert stopped.returncode == 0 and "Ctrl-C" in stopped.stderr, stopped.stderr[-2000:]
    assert "0 steps" in stopped.stdout and "--resume continues it" in stopped.stdout
    assert torch.load(os.path.join(_latest(out), "trainer_state.pt"), weights_only=True)["step"] == 0
    monkeypatch.undo()
    again = _in_process(setup, out, 2, *extra, "--resume", mode="clipo")
    assert again.returncode == 0, again.stderr[-2000:]
    assert [_untimed(r) for r in _metrics(out)] == [_untimed(r) for r in _metrics(full)]
    wa, wb = _weights(out), _weights(full)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_clipo_warmup_is_fixed_when_the_run_starts(tmp_path):
    """Its default follows --steps (a tenth); a resume with other --steps, or none, keeps the
    run's (it was refused: '--clipo-warmup 3 differs from the run's 2')."""
    out = str(tmp_path / "clipo")
    first = train.parse_args(["--mode", "clipo", "--steps", "20", "--out", out])
    os.makedirs(out)
    checkpoint.record_args(out, vars(first), 0)
    for steps in (["--steps", "30"], []):
        resumed = train.parse_args(["--mode", "clipo", "--out", out, "--resume", *steps])
        assert resumed.clipo_warmup == 2 and not train.resume_mismatches(resumed)
    assert train.parse_args(["--mode", "clipo", "--out", out, "--resume"]).steps == 20
    checkpoint.record_args(out, {**vars(first), "steps": 40}, 10)  # a resume that changed --steps
    assert train.parse_args(["--mode", "clipo", "--out", out, "--resume"]).steps == 40


def _problem_file(path, count, seed):
    rng = random.Random(seed)
    exclude = problem_source.never_train_on("tiny")
    found = {}
    while len(found) < count:
        p = problem_source.random_problem(rng, exclude=exclude, **problem_source.PRESETS["tiny"])
        found[countdown.problem_key(*p)] = p
    path.write_text("".join(json.dumps({"nums": list(p.nums), "target": p.target}) + "\n" for p in found.values()))
    return list(found.values())


def test_training_on_a_file_never_draws_its_held_out_split_and_resumes_exactly(setup, monkeypatch):
    """--data FILE --heldout 6: SFT and GRPO draw only the file's other problems (every draw
    recorded, across a stop and its resume), the evaluations read the split (split.json), and
    the resumed GRPO run equals an unbroken one."""
    data = setup / "mine.jsonl"
    problems = _problem_file(data, 24, seed=11)
    drawn = []
    real = problem_source.Problems.draw
    monkeypatch.setattr(problem_source.Problems, "draw", lambda self, rng: drawn.append(real(self, rng)) or drawn[-1])
    flags = ("--data", data, "--heldout", "6")
    sft_run = _in_process(setup, setup / "data-sft", 3, *flags, "--batch-size", "4", mode="sft")
    assert sft_run.returncode == 0, sft_run.stderr[-2000:]
    whole = _in_process(setup, setup / "data-whole", 4, *flags)
    assert whole.returncode == 0, whole.stderr[-2000:]
    out = setup / "data-broken"
    with monkeypatch.context() as patched:
        patched.setattr(train, "StopRequest", StopAfterTwoSteps)
        assert _in_process(setup, out, 4, *flags).returncode == 0
    assert _metrics(out)[-1]["step"] == 2
    again = _in_process(setup, out, 4, *flags, "--resume")
    assert again.returncode == 0, again.stderr[-2000:]
    assert [_untimed(r) for r in _metrics(out)] == [_untimed(r) for r in _metrics(setup / "data-whole")]
    split = json.loads((out / "split.json").read_text())
    held = {countdown.problem_key(nums, target) for nums, target in split["heldout"]}
    assert len(held) == 6 and split["train"] == 18 and held <= {countdown.problem_key(*p) for p in problems}
    assert drawn and not {countdown.problem_key(*p) for p in drawn} & held
    first_four = [tuple(nums) for nums, _ in split["heldout"][:4]]  # --eval-problems 4: the split's first four
    shown = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()][0]["answers"]
    assert [tuple(a["nums"]) for a in shown] == first_four

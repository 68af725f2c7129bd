"""rl.py's options against independent references: --mask-truncated against the same update on
the batch without the cut rollouts, the sampling rounds against the rounds drawn one by one,
--normalise-terms against a loop, and the trainer's log-probs in a run at other temperatures."""
import json
import math
import types

import pytest
import torch

import cli
import countdown
import pseudo_outcome
import rewards
import rl
import run as run_module
import train


def _run(tiny, out, *flags):
    args = train.parse_args(["--model", str(tiny / "model"), "--out", str(tiny / out), "--procs", "1",
                             "--prompts-per-step", "4", "--group-size", "4", "--max-new-tokens", "30",
                             "--lr", "1e-2", *flags])
    torch.set_num_threads(1)
    return run_module.build_run(args, 0, 1, torch.device("cpu"))[0]


def _rollouts(run, step=0):
    r, _ = rl.roll_out(run, step, keep=run.args.prompts_per_step)
    rl.old_pass(run, r, pooled=False)
    return r


def _rows(r, rows):
    """The Rollouts of these rows only (a reference batch built by hand)."""
    idx = torch.tensor(rows)
    return rl.Rollouts(problems=[r.problems[i] for i in rows], tokens=[r.tokens[i] for i in rows],
                       texts=[r.texts[i] for i in rows], ids=r.ids[idx], attention=r.attention[idx],
                       response=r.response[idx], start=r.start, finished=[r.finished[i] for i in rows],
                       sampler_logp=r.sampler_logp[idx], old_logp=r.old_logp[idx], advantages=r.advantages[idx],
                       loss_mask=r.response[idx])


def test_mask_truncated_trains_as_if_the_cut_rollouts_were_not_in_the_batch(tiny):
    """One update with --mask-truncated has the gradient of the update on the batch without the
    rollouts cut by the budget, their advantages kept as the whole group gave them (gradients, not
    weights, are compared: Adam's first step turns a 1e-9 difference into a sign)."""
    flags = ("--minibatches", "1", "--no-shared-prompt", "--max-new-tokens", "12", "--temperature", "1.5")
    run = _run(tiny, "masked", *flags, "--mask-truncated")
    r = _rollouts(run)
    finished = [i for i, done in enumerate(r.finished) if done]
    assert 0 < len(finished) < len(r.finished)
    r.advantages = torch.randn(r.response.shape, generator=torch.Generator().manual_seed(0))[:, :1].expand_as(r.response)
    r.loss_mask = rl.loss_mask(r, True)
    rl.update(run, r)
    reference = _run(tiny, "reference", *flags)
    rl.update(reference, _rows(r, finished))
    for mine, theirs in zip(run.model.parameters(), reference.model.parameters()):
        assert torch.allclose(mine.grad, theirs.grad, atol=1e-7, rtol=1e-4)
    unmasked = _run(tiny, "unmasked", *flags)
    r.loss_mask = r.response
    rl.update(unmasked, r)
    assert any((a.grad - b.grad).abs().max() > 1e-4 for a, b in zip(unmasked.model.parameters(), run.model.parameters()))


def test_sampling_rounds_go_on_until_enough_groups_have_signal(tiny, monkeypatch):
    """roll_out against the rounds drawn one at a time (sample_round): it stops at the first
    round after which `keep` groups have signal, or at --max-sample-rounds, and trains on the
    groups with signal first, in drawn order; its solves count every drawn rollout, kept or not
    (sampled_success_rate: the kept ones are chosen for their signal)."""
    monkeypatch.setattr(countdown, "verify", pseudo_outcome.verify)
    run = _run(tiny, "rounds", "--max-sample-rounds", "4", "--prompts-per-step", "8")
    checked, selected = set(), 0
    for step in range(6):
        r, sampled = rl.roll_out(run, step, keep=8)
        rounds, sampled_flat = sampled["rounds"], sampled["flat"]
        drawn = [rl.sample_round(run, step, k) for k in range(4)]
        signal = [sum(not f for f in d["flat"]) for d in drawn]
        expected = next((k + 1 for k in range(4) if sum(signal[:k + 1]) >= 8), 4)
        assert rounds == expected
        flat = [f for d in drawn[:expected] for f in d["flat"]]
        problems = [p for d in drawn[:expected] for p in d["problems"]]
        chosen = rl.choose_groups(flat, 8)
        assert r.problems[::4] == [problems[g] for g in chosen]
        assert sampled_flat == flat
        solved = sum(rewards.outcome([p for p in d["problems"] for _ in range(4)], d["texts"])[0].sum().item()
                     for d in drawn[:expected])
        assert sampled["solved"] == solved
        selected += rewards.outcome(r.problems, r.texts)[0].sum().item() / len(r.texts) != solved / (len(flat) * 4)
        checked.add(expected)
    assert len(checked) > 1  # steps that needed different numbers of rounds
    assert selected  # steps where the kept rollouts' success differs from the sampled
    one = _run(tiny, "one-round", "--max-sample-rounds", "1")  # the problems of the first round alone
    assert rl.roll_out(one, 0, keep=4)[0].problems[::4] == rl.draw_problems(one, 0, 0)


def _norm(values):
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return [0.0 if max(values) == min(values) else (v - mean) / (std + 1e-6) for v in values]


def test_normalise_terms_against_a_loop():
    g = torch.Generator().manual_seed(0)
    group, n = 4, 12
    correct = (torch.rand(n, generator=g) > 0.5).float()
    bonuses = {"critic": 0.5 * torch.rand(n, generator=g), "clipo": -0.2 * torch.rand(n, generator=g)}
    bonuses["critic"][4:8] = 0.3  # a group whose bonus does not vary
    args = types.SimpleNamespace(normalise_terms=True, no_scale_adv=False, format_reward=0.0, group_size=group,
                                 critic_coef=0.5, clipo_lambda=0.2)
    run = types.SimpleNamespace(args=args, device=torch.device("cpu"), terms=rewards.REWARD_TERMS)  # weight: static
    r = types.SimpleNamespace(correct=correct, formatted=torch.zeros(n), bonuses=bonuses,
                              reward=correct + sum(bonuses.values()), step_rewards=torch.zeros(n, 3))
    got = rl.advantages(run, r)[:, 0]
    for k in range(0, n, group):
        expected = _norm(correct[k:k + group].tolist())
        for name, weight in (("critic", 0.5), ("clipo", 0.2)):
            expected = [e + weight * b for e, b in zip(expected, _norm(bonuses[name][k:k + group].tolist()))]
        assert torch.allclose(got[k:k + group], torch.tensor(expected), atol=1e-5), k
    args.normalise_terms = False  # off: the outcome normalised, each bonus centred in its group and added
    for k in range(0, n, group):
        expected = _norm(correct[k:k + group].tolist())
        for bonus in bonuses.values():
            part = bonus[k:k + group].tolist()
            expected = [e + b - sum(part) / group for e, b in zip(expected, part)]
        assert torch.allclose(rl.advantages(run, r)[k:k + group, 0], torch.tensor(expected), atol=1e-5), k


def test_a_flat_group_keeps_a_credit_at_its_own_size():
    """Every rollout of the group solved and their credits differ by 0.02: the advantages differ
    by 0.02 (the bonus centred, added after the outcome's normalisation), not by a full unit as
    when the bonus joined the reward before a normalisation by the group's tiny spread."""
    args = types.SimpleNamespace(normalise_terms=False, no_scale_adv=False, format_reward=0.0, group_size=4)
    run = types.SimpleNamespace(args=args, device=torch.device("cpu"))
    bonus = torch.tensor([0.0, -0.02, 0.0, 0.0])
    r = types.SimpleNamespace(correct=torch.ones(4), formatted=torch.ones(4), bonuses={"oracle": bonus},
                              step_rewards=torch.zeros(4, 3))
    got = rl.advantages(run, r)[:, 0]
    assert torch.allclose(got, torch.tensor([0.005, -0.015, 0.005, 0.005]), atol=1e-6)
    assert max(abs(x) for x in _norm((1 + bonus).tolist())) > 1  # what the reward before normalisation gave


def test_term_shifts_by_hand_per_group_kind():
    """A term's part of every token's advantage: its centred bonus plus the rewards-to-go of its
    own step rewards, averaged over the response tokens of each kind of group."""
    args = types.SimpleNamespace(normalise_terms=False, no_scale_adv=False, group_size=2)
    run = types.SimpleNamespace(args=args, device=torch.device("cpu"))
    response = torch.tensor([[1.0, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1], [1, 1, 1]])
    steps = torch.zeros(6, 3)
    steps[4, 1] = -0.5  # a charge on the second token of a solved rollout: its first two tokens carry it
    r = types.SimpleNamespace(correct=torch.tensor([1.0, 0, 1, 1, 0, 0]), response=response,
                              bonuses={"clipo": torch.tensor([0.1, -0.1, 0.2, 0.0, 0.0, 0.0])},
                              term_steps={"oracle": steps}, lengths=[2, 3, 1, 2, 3, 3])
    r.correct[4] = 1.0  # groups: mixed (rows 0-1), solved (2-3), mixed (4-5)
    shifts = rl.term_shifts(run, r)
    # clipo: |0.1| x 2 tokens + |-0.1| x 3, then |0.1| x 1 + |-0.1| x 2, then 0
    assert shifts["clipo/adv_shift"] == (pytest.approx(0.5 + 0.3), "tokens")
    assert shifts["clipo/adv_shift_solved"] == (pytest.approx(0.3), "tokens_solved")
    assert shifts["clipo/adv_shift_mixed"] == (pytest.approx(0.5), "tokens_mixed")
    assert shifts["oracle/adv_shift"] == (pytest.approx(1.0), "tokens")
    assert shifts["oracle/adv_shift_failed"] == (0.0, "tokens_failed")


def _last_row(out):
    with open(out / "metrics.jsonl") as f:
        return [json.loads(line) for line in f][-1]


@pytest.mark.parametrize("flags,gap", [(("--temperature", "0.7"), 1e-5), (("--temperature", "1.3"), 1e-5),
                                       (("--temperature", "0.7", "--bf16"), 0.1)])
def test_a_run_s_old_log_probs_are_the_sampler_s(tiny, flags, gap):
    """The logged sampler_logp_gap: ~0 in fp32 at any temperature; with --bf16 rollouts it
    measures the bf16 copy's difference (the figure in docs/grpo.md#grpo-and-the-one-loop-grpopy-rlpy-trainpy)."""
    out = tiny / ("gap" + "".join(flags).replace("-", "_"))
    result = cli.run(train.main, ["--model", tiny / "model", "--out", out, "--steps", 1, "--prompts-per-step", 4,
                                  "--group-size", 4, "--max-new-tokens", 30, "--eval-every", 5, "--eval-problems", 4,
                                  "--procs", 1, "--max-sample-rounds", 1, *flags])
    assert result.returncode == 0, result.stderr[-2000:]
    row = _last_row(out)
    assert row["sampler_logp_gap"] < gap and row["sample_rounds"] == 1
    if "--bf16" in flags:
        assert row["sampler_logp_gap"] > 1e-4


def test_top_k_reaches_the_sampler(tiny):
    """--top-k 1 samples greedily: every group's rollouts are the same, so no group has signal."""
    out = tiny / "topk"
    result = cli.run(train.main, ["--model", tiny / "model", "--out", out, "--steps", 1, "--prompts-per-step", 4,
                                  "--group-size", 4, "--max-new-tokens", 30, "--eval-every", 5, "--eval-problems", 4,
                                  "--procs", 1, "--top-k", "1"], outcome=pseudo_outcome.verify)
    assert result.returncode == 0, result.stderr[-2000:]
    assert _last_row(out)["zero_adv_frac"] == 1.0


def test_a_term_s_ratio_is_a_ratio_of_global_sums(monkeypatch):
    """Two processes whose counts differ: a (sum, count) metric is the sums' ratio over both (2
    of 16 and 50 of 64 anchors: 52 / 80), not the mean of their ratios (0.45); a plain number
    is averaged over the processes. The collective is simulated by adding the two processes' sums."""
    import metrics
    first, second = metrics.StepMetrics(torch.device("cpu")), metrics.StepMetrics(torch.device("cpu"))
    for m, (anchors, rows, loss) in ((first, (2, 16, 0.5)), (second, (50, 64, 0.1))):
        m.term("clipo/valid_frac", (anchors, rows))
        m.term("critic/online_loss", loss)
    monkeypatch.setattr(metrics, "all_reduce", lambda sums, world, op="sum": {k: first.sums[k] + second.sums[k]
                                                                              for k in first.sums})
    row, _ = first.reduce(2)
    assert row["clipo/valid_frac"] == pytest.approx(52 / 80) and row["critic/online_loss"] == pytest.approx(0.3)


def test_a_group_is_flat_only_when_the_outcome_and_every_term_s_pay_are():
    """Each part apart: a solve charged its full worth (1 - 1 = 0) beside a failure (0) has equal
    totals but an outcome that differs (signal); an all-solved group whose charges differ has
    signal too; only equal outcomes and equal pay is flat."""
    outcome = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    charge = torch.tensor([-1.0, 0.0, -0.2, 0.0, 0.0, 0.0])
    assert rl.flat_groups([outcome, charge], 2) == [False, False, True]
    assert rl.flat_groups([outcome + charge], 2) == [True, False, True]  # the sum hid the first group's signal

"""rewards.py: state values, sequence and process credit, character offsets -> token positions,
checked on hand-computed cases."""
import math

import pytest
import torch

import answers
import countdown
import critic
import critic_data
import forward
import rewards
import terms
from grpo import group_advantages, normalise_step_rewards, rewards_to_go
from model import TinyTokenizer, token_end_offsets

P = countdown.Problem((21, 16, 17, 26), 46)
TRACE = countdown.search_trace(*P, style="compact")


def test_token_end_offsets_tiny_tokenizer_with_reversed_digits():
    tok = TinyTokenizer()
    text = "Numbers: [21, 16]\n54+26=80\n<Solution>"
    ids = tok.encode(text) + [tok.eos_token_id]
    ends = token_end_offsets(tok, ids)
    # "Numbers: " is one token of 9 characters; every other piece is one character; EOS writes none
    assert ends[:3] == [9, 10, 11] and ends[-1] == ends[-2] == len(text)
    assert len(ends) == len(ids) and ends == sorted(ends)
    # the token that finishes writing "80" is the one holding its most significant digit ("8"),
    # which the tokenizer emits last: digits go least significant first
    last_digit = text.index("80") + 1
    k = next(j for j, e in enumerate(ends) if e > last_digit)
    assert tok.pieces[ids[k]] == "8" and tok.pieces[ids[k - 1]] == "0"


class _Splitting:
    """A tokenizer whose single tokens do not decode alone (like byte-level BPE halves of a
    character): token_end_offsets must notice and fall back to prefix decoding."""

    def decode(self, ids, skip_special_tokens=True):
        text = "".join("é" if i == 1 else "x" for i in ids)
        return text.replace("éé", "É") if len(ids) > 1 else text


def test_token_end_offsets_falls_back_when_pieces_do_not_add_up():
    assert token_end_offsets(_Splitting(), [0, 1, 1, 0]) == [1, 2, 2, 3]


def test_state_values_oracle_and_sequence_credit():
    values = rewards.state_values([P], [TRACE])[0]
    # states: [37,17,26] yes, [54,26] no, 80 28 1404 no, [20,26] yes, 46 yes
    assert [s.value for s in values] == [1, 0, 0, 0, 0, 1, 1]
    assert [s.size for s in values] == [3, 2, 1, 1, 1, 2, 1]
    assert [TRACE[s.offset] for s in values] == ["]", "]", "0", "8", "4", "]", "6"]
    assert [TRACE[s.offset + 1] for s in values] == ["\n", "\n", "|", "|", "|", "\n", "|"]
    bonus = rewards.sequence_credit([values, []])
    assert torch.allclose(bonus, torch.tensor([3 / 7, 0.0]))


def test_process_credit_puts_values_on_the_finishing_tokens():
    tok = TinyTokenizer()
    ids = tok.encode(TRACE) + [tok.eos_token_id]
    values = rewards.state_values([P], [TRACE])
    steps, mask = rewards.token_rewards([[(s.offset, s.value) for s in values[0]]], [ids], tok, len(ids) + 3)
    positions = mask[0].nonzero().squeeze(-1).tolist()
    assert len(positions) == 7 and steps[0, positions].tolist() == [1, 0, 0, 0, 0, 1, 1]
    # by hand: the first state ends at "]" of "21+16=37 [37,17,26]", the 19th character after
    # the 5 of the order line "+-*/\n"
    assert positions[0] == 23 and tok.pieces[ids[23]] == "]"
    assert tok.pieces[ids[positions[-1]]] == "4"  # "46" finishes with its tens digit (written last)


def test_process_advantages_by_hand():
    """Two rollouts, group of 2; outcome 1 and 0; steps (t=1: 1.0), (t=3: 0.0) and (t=2: 0.5)."""
    outcome = torch.tensor([1.0, 0.0])
    steps = torch.zeros(2, 5)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    steps[0, 1], steps[0, 3], steps[1, 2] = 1.0, 0.0, 0.5
    mask[0, 1] = mask[0, 3] = mask[1, 2] = True
    adv = group_advantages(outcome, 2)[:, None] + rewards_to_go(0.5 * normalise_step_rewards(steps, mask, 2))
    a = 0.5 / ((0.5 ** 2 * 2) ** 0.5 + 1e-6)  # outcome: (1 - 0.5) / unbiased std of (1, 0)
    s = 0.5  # steps 1.0, 0.0, 0.5: mean 0.5, unbiased std 0.5
    n1, n2, n3 = (1.0 - 0.5) / (s + 1e-6), (0.0 - 0.5) / (s + 1e-6), (0.5 - 0.5) / (s + 1e-6)
    expected = torch.tensor([[a + 0.5 * (n1 + n2)] * 2 + [a + 0.5 * n2] * 2 + [a],
                             [-a + 0.5 * n3] * 3 + [-a] * 2])
    assert torch.allclose(adv, expected, atol=1e-5)


class _FakeCritic:
    """Scores 5 for the target 46 from any state holding 46 or 20 (say), 0 otherwise."""

    def score(self, states, targets):
        return torch.tensor([5.0 if t == 46 and ({46, 20} & set(s)) else 0.0 for s, t in zip(states, targets)])


class _IdealCritic(critic.Critic):
    """Scores +5 where the target can be reached from the state, -5 where not: a perfect ranking,
    on no scale a credit could read as it is."""

    def score(self, states, targets):
        return torch.tensor([5.0 if countdown.solvable(s, t) else -5.0 for s, t in zip(states, targets)])


def ideal_critic():
    model = _IdealCritic()
    critic.calibrate(model, critic_data.calibration_rows("tiny"), "tiny")
    return model


def test_the_calibration_is_a_logistic_fit_of_own_target_labels():
    """On a critic whose score is the label plus noise, the fit recovers the labels' log-odds:
    a score of 0 (half way) reads ~0.5, and the fit per size is monotone increasing; a size whose
    labels are one class (every 3- and 4-number state of `tiny`'s searches reaches) reads its
    smoothed rate. A label is whether the row's own search reached its target below the state."""
    model = _IdealCritic()
    rows = critic_data.calibration_rows("tiny", searches=40)
    fits = critic.calibrate(model, rows, "tiny")
    assert set(fits) == {1, 2, 3, 4}
    for size in (1, 2):
        a, b = fits[size]
        assert a > 0 and abs(b / a) < 0.5  # the boundary between -5 and +5 sits near 0
    for size in (3, 4):
        assert fits[size] == pytest.approx((0.0, math.log(40.5 / 0.5)))
    assert critic_data.own_target_labels([((3, 4), {7, 12}, 12), ((3, 4), {7, 12}, 50)]) == \
        ([(3, 4), (3, 4)], [12, 50], [1.0, 0.0])


# --- credits that do not charge for exploring (hand-built traces, exact per-token values) ------

# the reference search of P writes (oracle values): [37,17,26] 1, [54,26] 0, leaves 80 28 1404 0,
# [20,26] 1, leaf 46 1 (compact style: TRACE). A rollout that stops after the first dead-end leaf
# and writes a false solution:
EARLY = "21+16=37 [37,17,26]\n37+17=54 [54,26]\n54+26=80|46\n<Solution>\n21 + 16 = 37\n37 + 17 = 54\n54 + 26 = 80\n</Solution>\n"


def _credit_tokens(credits, text):
    tok = TinyTokenizer()
    ids = tok.encode(text) + [tok.eos_token_id]
    steps, _ = rewards.token_rewards([credits], [ids], tok, len(ids))
    return ids, steps[0]


def _finishing_token(text, offset):
    tok = TinyTokenizer()
    ids = tok.encode(text)
    ends = token_end_offsets(tok, ids)
    return next(j for j, e in enumerate(ends) if e > offset)


def test_move_credit_pays_the_best_state_per_depth_and_nothing_for_dead_ends():
    values = rewards.state_values([P], [TRACE])[0]
    credits = rewards.move_credit([values])[0]
    # depth 3 ([37,17,26]), depth 2 ([20,26]: [54,26] was a dead end), leaf 46
    assert credits == [(values[0].offset, 1.0), (values[5].offset, 1.0), (values[6].offset, 1.0)]
    ids, steps = _credit_tokens(credits, TRACE)
    expected = torch.zeros(len(ids))
    for s in (values[0], values[5], values[6]):
        expected[_finishing_token(TRACE, s.offset)] = 1.0
    assert torch.equal(steps, expected)
    # soft values: the highest of each size, the first of equals
    soft = [rewards.State(5, 3, 0.2), rewards.State(9, 2, 0.1), rewards.State(14, 2, 0.7), rewards.State(20, 2, 0.7),
            rewards.State(25, 1, 0.0)]
    assert rewards.move_credit([soft]) == [[(5, 0.2), (14, 0.7)]]


def test_potential_credit_is_the_change_of_value_in_writing_order():
    values = rewards.state_values([P], [TRACE])[0]
    credits = rewards.potential_credit([values], [1.0])[0]
    assert [r for _, r in credits] == [0.0, -1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert sum(r for _, r in credits) == values[-1].value - 1.0  # telescopes to V(last) - V(initial)
    ids, steps = _credit_tokens(credits, TRACE)
    assert steps[_finishing_token(TRACE, values[1].offset)] == -1.0
    assert steps[_finishing_token(TRACE, values[5].offset)] == 1.0 and steps.abs().sum() == 2.0


def test_no_credit_is_earned_by_stopping_early_with_a_wrong_solution():
    """A rollout's earnings (outcome + 0.1 format + beta x its step rewards) for the early stop
    never reach the complete search's, for any beta <= 1 and any credit."""
    early, full = [rewards.state_values([P], [t])[0] for t in (EARLY, TRACE)]
    assert countdown.verify(P.nums, P.target, TRACE) and not countdown.verify(P.nums, P.target, EARLY)
    outcome = {id(early): 0.0 + 0.1, id(full): 1.0 + 0.1}  # both write a parsable <Solution> block
    for credit in ("move", "potential"):
        def earned(vs):
            steps = rewards.move_credit([vs])[0] if credit == "move" else rewards.potential_credit([vs], [1.0])[0]
            return sum(r for _, r in steps)
        for beta in (0.1, 0.5, 1.0):
            assert outcome[id(early)] + beta * earned(early) < outcome[id(full)] + beta * earned(full), (credit, beta)
        assert earned(early) <= earned(full), credit  # even without the outcome reward


def test_a_guess_never_out_earns_a_search_that_goes_on():
    """The default reward, through rl.score: a block written after a search that missed earns
    no more than a search still going when the budget ran out; only a verified block earns."""
    import types
    import rl
    import train
    searched = TRACE.split("<Solution>")[0]
    missed = searched.replace("26+20=46|46\n", "")  # the search without its hit
    guess = missed + "<Solution>\n21 + 16 = 37\n37 + 17 = 54\n54 - 26 = 28\n</Solution>\n"
    texts = [TRACE, guess, searched[:60], searched]  # solved; a guess; out of tokens; stopped without a block
    r = rl.Rollouts(problems=[P] * 4, tokens=[[0]] * 4, texts=texts, ids=None, attention=None,
                    response=torch.zeros(4, 3), start=0)
    rl.score(types.SimpleNamespace(args=train.parse_args([]), terms={}), r, step=0)
    assert r.reward.tolist() == [1.0, 0.0, 0.0, 0.0]
    assert answers.failure(P.nums, P.target, guess, True) == "guess"


def _four_rollouts():
    """A group of four answers to P: the reference search (solved, dead ends written), the same
    search with every move the oracle calls dead left out (solved, pruned), a guess after a
    search that missed, and a search cut by the budget."""
    head, block = TRACE.split("<Solution>")
    moves = [line for line in head.split("\n")[1:] if line]
    written = answers.read_search(P.nums, P.target, head)
    pruned = "\n".join([head.split("\n")[0]] + [m for m, w in zip(moves, written) if w.reaches]) + "\n<Solution>" + block
    guess = head.replace("26+20=46|46\n", "") + "<Solution>\n21 + 16 = 37\n37 + 17 = 54\n54 - 26 = 28\n</Solution>\n"
    texts = {"dead ends": TRACE, "pruned": pruned, "guess": guess, "out of budget": head[:60]}
    assert [answers.failure(P.nums, P.target, t, k != "out of budget") for k, t in texts.items()] == \
        ["solved", "solved", "guess", "out of tokens"]
    return texts


def _returns(credit, beta):
    """Each rollout's return through rl.score and rl.advantages, the group normalisation applied:
    the advantage of its first response token (outcome + the rewards-to-go of every step)."""
    import types
    import rl
    import train
    texts, tok = _four_rollouts(), TinyTokenizer()
    args = train.parse_args(["--mode", "oracle", "--critic-credit", credit, "--critic-coef", str(beta),
                             "--group-size", "4"])
    run = types.SimpleNamespace(args=args, tokenizer=tok, device=torch.device("cpu"))
    run.terms = {"oracle": rewards.REWARD_TERMS["oracle"](run)}
    tokens = [tok.encode(t) + [tok.eos_token_id] for t in texts.values()]
    ids, attention, response, start = forward.pack_rollouts([[5, 6]], tokens, tok.pad_token_id, "cpu")
    r = rl.Rollouts(problems=[P] * 4, tokens=tokens, texts=list(texts.values()), ids=ids, attention=attention,
                    response=response, start=start, finished=[True, True, True, False])
    rl.score(run, r, step=0)
    return dict(zip(texts, rl.advantages(run, r)[:, start].tolist()))


@pytest.mark.parametrize("credit", ["prune", "prune-steps"])
@pytest.mark.parametrize("beta", [0.1, 0.3, 0.5])
def test_the_prune_credits_cannot_be_won_without_solving(credit, beta):
    """A guess never out-earns a search that runs out of budget, and a solved search that writes
    dead ends never out-earns the same search without them (docs/critic.md#from-values-to-rewards-six-credits---critic-credit)."""
    earned = _returns(credit, beta)
    assert earned["guess"] <= earned["out of budget"] + 1e-6
    assert earned["dead ends"] < earned["pruned"]
    assert min(earned["dead ends"], earned["pruned"]) > max(earned["guess"], earned["out of budget"])


@pytest.mark.parametrize("credit", rewards.CREDITS)
def test_no_credit_pays_a_guess_more_than_a_search_cut_by_the_budget(credit):
    """Before it guessed, the missed search wrote a live 2-number state ([20, 26]) as its last
    state, while the cut search's last state is a dead leaf: move and potential credit paid the
    guess more (docs/critic.md). A blind answer's states are worth nothing now, under every credit."""
    earned = _returns(credit, 0.5)
    assert earned["guess"] <= earned["out of budget"] + 1e-6, credit


VERIFIED_BLOCK = "<Solution>" + TRACE.split("<Solution>")[1]


@pytest.mark.parametrize("source", ["oracle", "critic"])
@pytest.mark.parametrize("credit", rewards.CREDITS)
def test_a_verified_guess_never_out_earns_an_honest_solved_search(source, credit):
    """A right block after a search that wrote only a live state and never reached the target,
    and a right block with no search at all, both verify; neither may earn more than the honest
    search that writes its dead ends and finds the target (whose block is the same), under
    every credit, from the oracle and from an ideal critic, through rl.score and rl.advantages."""
    texts = {"honest": TRACE, "lucky": "+-*/\n21+16=37 [37,17,26]\n" + VERIFIED_BLOCK,
             "bare": "+-*/\n" + VERIFIED_BLOCK, "cut": TRACE[:60]}
    assert [countdown.verify(P.nums, P.target, t) for t in texts.values()] == [True, True, True, False]
    assert rewards.state_values([P], [texts["lucky"]])[0][0].value == 0.0  # [37,17,26] is live, but blind
    earned = _earned(texts, source, credit, 0.5, finished=[True, True, True, False])
    assert earned["lucky"] <= earned["honest"] + 1e-6 and earned["bare"] <= earned["honest"] + 1e-6, earned


def _earned(texts, source, credit, beta, finished):
    """Each text's return (the advantage of its first response token) in one group, through
    rl.score and rl.advantages, valued by the oracle or an ideal critic."""
    import types
    import rl
    import train
    tok = TinyTokenizer()
    args = train.parse_args(["--mode", source, "--critic-credit", credit, "--critic-coef", str(beta),
                             "--group-size", str(len(texts))])
    run = types.SimpleNamespace(args=args, tokenizer=tok, device=torch.device("cpu"))
    term = terms.StateCredit(run)  # the critic's and the oracle's credit, valued by `critic` (None: the oracle)
    term.critic = ideal_critic() if source == "critic" else None
    run.terms = {source: term}
    tokens = [tok.encode(t) + [tok.eos_token_id] for t in texts.values()]
    ids, attention, response, start = forward.pack_rollouts([[5, 6]], tokens, tok.pad_token_id, "cpu")
    r = rl.Rollouts(problems=[P] * len(texts), tokens=tokens, texts=list(texts.values()), ids=ids,
                    attention=attention, response=response, start=start, finished=finished)
    rl.score(run, r, step=0)
    return dict(zip(texts, rl.advantages(run, r)[:, start].tolist()))


def test_refilling_reads_a_credit_s_signal():
    """A group whose rollouts all solve, one writing dead ends and one not, has no signal in its
    outcome and some in the prune credit: StateCredit.signal says what each would earn."""
    import types
    import train
    texts = list(_four_rollouts().values())[:2]  # the reference search (dead ends), the pruned one
    args = train.parse_args(["--mode", "oracle", "--critic-credit", "prune-steps", "--critic-coef", "0.5"])
    run = types.SimpleNamespace(args=args, tokenizer=TinyTokenizer(), device=torch.device("cpu"))
    term = rewards.REWARD_TERMS["oracle"](run)
    paid = term.signal(run, [P, P], texts, torch.ones(2)).tolist()
    dead = [not line.reaches for line in answers.read_search(P.nums, P.target, TRACE)]
    assert paid == pytest.approx([-0.5 * sum(dead) / len(dead), 0.0])


def test_an_illegal_state_is_worth_nothing():
    """The issue's case: on (8, 9, 5, 9) -> 31 the one line `8+9=31|31` wrote the target as a leaf;
    no legal move makes it, so its value is 0 from the oracle and from the critic alike."""
    problem = countdown.Problem((8, 9, 5, 9), 31)
    text = "+-*/\n8+9=31|31\n<Solution>\n8 + 9 = 31\n</Solution>\n"
    for source in (None, ideal_critic()):
        assert [s.value for s in rewards.state_values([problem], [text], source)[0]] == [0.0]
    assert rewards.legal_states(answers.read_search(P.nums, P.target, TRACE), answers.extract_states(TRACE)) == [True] * 7


@pytest.mark.parametrize("source", ["oracle", "critic"])
@pytest.mark.parametrize("credit", rewards.CREDITS)
def test_a_fabricated_line_never_out_earns_an_honest_search(source, credit):
    """`21+16=46|46` writes the target as a leaf in one illegal line, then the right block: it
    verifies, and must earn no more than the honest search that finds the same block (with its
    dead ends), for every credit, from the oracle and from an ideal critic. Beside them, the
    fabricated line with a wrong block earns no more than an honest search cut by the budget."""
    texts = {"honest": TRACE, "fabricated": "+-*/\n21+16=46|46\n" + VERIFIED_BLOCK,
             "cut": TRACE[:60], "fabricated wrong": "+-*/\n21+16=46|46\n<Solution>\n21 + 16 = 46\n</Solution>\n"}
    assert [countdown.verify(P.nums, P.target, t) for t in texts.values()] == [True, True, False, False]
    earned = _earned(texts, source, credit, 0.5, finished=[True, True, False, True])
    assert earned["fabricated"] <= earned["honest"] + 1e-6, earned
    assert earned["fabricated wrong"] <= earned["cut"] + 1e-6, earned

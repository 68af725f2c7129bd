"""The testbed's demonstrations (countdown.search_trace with skip=) and the reading of what an
answer wrote (answers.py), against independent references: a depth-first writer written here,
hand-built traces with known counts, and a digest of the traces main wrote before skip= existed."""
import hashlib
import itertools
import random

import pytest

import answers
import countdown
import sft
from model import TinyTokenizer
from problems import PRESETS, TARGET_RANGE, random_problem


def _problems(n, seed=7, preset="tiny"):
    rng = random.Random(seed)
    return [random_problem(rng, **PRESETS[preset]) for _ in range(n)]


def test_without_skips_the_traces_are_main_s_byte_for_byte():
    """skip=0 draws nothing and writes what main wrote before skip= existed: the digest of 300
    compact + LongProc traces computed with that code (commit ee8f011)."""
    rng = random.Random(3)
    text = "".join(countdown.search_trace(*p, style="compact", skip=0.0, rng=rng) + countdown.search_trace(*p, skip=0.0, rng=rng)
                   for p in _problems(300))
    assert hashlib.sha256(text.encode()).hexdigest() == "c66ab2597a8985d6b0a3d1144712a84007855f2e7fcb07f5dd5a6b88b1e2dada"
    assert rng.random() == random.Random(3).random()  # no draw was made


def _reference_lines(state, target, draw, skip, lines):
    """The compact search lines, written here from the rules: every legal move in LongProc's
    order, one draw per move before its outcome is looked at, a passed-over move without its
    subtree; True once the target is found."""
    for i in range(len(state)):
        for j in range(i + 1, len(state)):
            rest = [x for k, x in enumerate(state) if k not in (i, j)]
            big, small = max(state[i], state[j]), min(state[i], state[j])
            for op, value in (("+", big + small), ("-", big - small), ("*", big * small),
                              ("/", big // small if small and big % small == 0 else None)):
                if value is None or value >= countdown.MAX_VALUE:
                    continue
                if draw() < skip:
                    continue
                if not rest:
                    lines.append(f"{big}{op}{small}={value}|{target}")
                    if value == target:
                        return True
                    continue
                child = [value] + rest
                lines.append(f"{big}{op}{small}={value} [{','.join(map(str, child))}]")
                if _reference_lines(child, target, draw, skip, lines):
                    return True
    return False


@pytest.mark.parametrize("skip", [0.2, 0.5])
def test_a_skipping_trace_is_the_reference_search_with_those_moves_and_their_subtrees_left_out(skip):
    tok = TinyTokenizer()
    found_some = failed_some = 0
    for k, p in enumerate(_problems(150, seed=11)):
        trace = countdown.search_trace(*p, style="compact", skip=skip, rng=random.Random(k))
        draws = random.Random(k)
        lines = []
        found = _reference_lines(list(p.nums), p.target, draws.random, skip, lines)
        head, _, _ = trace.partition("<Solution>" if found else countdown.NO_SOLUTION)
        assert head.split("\n")[1:-1] == lines  # after the order line, up to the block or NO_SOLUTION
        found_some += found
        failed_some += not found
        if found:
            assert countdown.verify(p.nums, p.target, trace)
        else:
            assert trace.endswith(countdown.NO_SOLUTION + "\n") and countdown.solution_block(trace) is None
        assert len(tok.encode(trace)) > 0
    assert found_some and failed_some  # both endings were checked


def test_a_skipping_trace_s_lines_are_a_subsequence_of_the_whole_search_tree():
    """Against the tree the reference search writes when it never stops (an unreachable target
    stands in; the restated targets are compared without it)."""
    for k, p in enumerate(_problems(60, seed=5)):
        tree = []
        _reference_lines(list(p.nums), -1, lambda: 1.0, 0.0, tree)
        tree = [line.split("|")[0] for line in tree]
        noisy = countdown.search_trace(*p, style="compact", skip=0.3, rng=random.Random(k))
        written = [line.split("|")[0] for line in noisy.split("<Solution>")[0].split("\n")[1:]
                   if line and line != countdown.NO_SOLUTION]
        at = 0
        for line in written:  # in order: each written line is found after the previous one
            at = tree.index(line, at) + 1
        assert written


def test_the_skips_do_not_depend_on_the_target():
    """Two targets, the same generator state: the moves both searches write are skipped alike,
    so one search's lines are the other's up to where it found its target."""
    compared = 0
    for k, p in enumerate(_problems(200, seed=13)):
        other = p.target + 1 if p.target < TARGET_RANGE[1] else p.target - 1
        if not countdown.solvable(p.nums, other):
            continue
        a, b = (countdown.search_trace(p.nums, t, style="compact", skip=0.3, rng=random.Random(k)) for t in (p.target, other))
        strip = lambda trace: [line.split("|")[0] for line in trace.split("<Solution>")[0].split("\n")[1:]
                               if line and line != countdown.NO_SOLUTION]
        la, lb = strip(a), strip(b)
        common = min(len(la), len(lb))
        assert la[:common] == lb[:common]
        compared += common
    assert compared > 1000


def test_demonstrations_are_cut_at_a_fixed_length_whatever_they_hold():
    tok = TinyTokenizer()
    lengths = []
    for k, p in enumerate(_problems(100, seed=3)):
        whole = tok.encode(countdown.search_trace(*p, style="compact", skip=0.25, rng=random.Random(k))) + [tok.eos_token_id]
        cut = sft.demonstration(tok, p, "compact", 0.25, 120, random.Random(k))
        assert cut == whole[:120]
        lengths.append(len(cut))
    assert max(lengths) == 120 and min(lengths) < 120  # long ones cut (no EOS), short ones whole


# ---------------------------------------------------------------------------------------------
# Reading what an answer wrote

NUMS, TARGET = (7, 5, 3, 6), 42
HAND = """+-*/
7+5=12 [12,3,6]
12+3=15 [15,6]
15+6=21|42
15*6=100|42
12/6=2|42
12-3=9 [9,6]
9+6=15|42
7*6=42|42
<Solution>
7 + 5 = 12
12 - 3 = 9
9 * 6 = 42
</Solution>
"""


def test_each_written_move_is_checked_against_the_state_it_continues():
    lines = answers.read_search(NUMS, TARGET, HAND)
    assert [line.parent for line in lines] == [NUMS, (12, 3, 6), (15, 6), (15, 6), (15, 6), (12, 3, 6), (9, 6), (9, 6)]
    # 15*6 is 90 (wrong arithmetic), 12/6 uses a 12 the state [15, 6] no longer holds, 7*6 a 7
    assert [line.legal for line in lines] == [True, True, True, False, False, True, True, False]
    assert [line.reaches for line in lines] == [True, False, False, False, False, False, False, True]
    counts = answers.search_counts(NUMS, TARGET, HAND)
    assert counts["lines"] == 8 and counts["leaf_misses"] == 4 and counts["dead_pairs"] == 2
    assert counts["process_errors"] == 3
    # passed over: [15,6]'s 15-6 and 15*6 (= 90: the line 15*6=100 is not that move), both dead,
    # once 12-3 leaves [15,6]; nothing of [12,3,6] (12+3, 12-3 are its first two moves) or of
    # [9,6] (the answer ends inside it)
    assert counts["skipped_dead"] == 2 and counts["skipped_live"] == 0


def test_moves_passed_over_by_hand():
    """The problem [3, 2, 1], target 6: its moves in the search's order are 3+2, 3-2, 3*2 (3/2
    is not whole), then the pairs (3, 1) and (2, 1)."""
    nums, target = (3, 2, 1), 6
    # the search writes 3+2 -> [5,1], its leaves 5+1 (found); moves of [3,2,1] after it never come
    found = "+-*/\n3+2=5 [5,1]\n5+1=6|6\n<Solution>\n3 + 2 = 5\n5 + 1 = 6\n</Solution>\n"
    assert answers.search_counts(nums, target, found)["skipped_dead"] == 0
    assert answers.search_counts(nums, target, found)["skipped_live"] == 0
    # it passes over 3+2 (live: 5+1=6) and writes 3-2 -> [1,1] (dead), whose leaves it skips but 1*1;
    # then 3*2 -> [6,1]: the state [1,1] is left, so its passed-over leaves count: 1+1 (dead),
    # 1-1 (dead), 1/1 (dead) (1*1 written)
    skipping = "+-*/\n3-2=1 [1,1]\n1*1=1|6\n3*2=6 [6,1]\n6*1=6|6\n<Solution>\n3 * 2 = 6\n6 * 1 = 6\n</Solution>\n"
    counts = answers.search_counts(nums, target, skipping)
    moves_of_6_1 = 2  # 6+1 (dead: 7), 6-1 (dead: 5) come before 6*1
    assert counts["skipped_live"] == 1 and counts["skipped_dead"] == 3 + moves_of_6_1
    assert counts["process_errors"] == 0 and counts["leaf_misses"] == 1 and counts["dead_pairs"] == 1
    # giving up leaves every state: everything not written is passed over
    gave_up = "+-*/\n3-2=1 [1,1]\n1*1=1|6\n" + countdown.NO_SOLUTION + "\n"
    moves = answers._moves((3, 2, 1), countdown.OPS)
    live_moves = sum(countdown.solvable(child, target) for _, child in moves)
    counts = answers.search_counts(nums, target, gave_up)
    assert counts["skipped_live"] == live_moves and counts["skipped_dead"] == len(moves) - 1 - live_moves + 3


def test_a_search_is_read_in_the_order_it_announces():
    """A whole reference search in any of the 24 orders passes nothing over when read in the
    order its first line announces; leaving out its first leaf that misses passes over exactly
    that dead move (read in LongProc's order instead, a search in another order would be
    counted as skipping)."""
    checked = 0
    for p in [p for p in _problems(40, seed=9) if countdown.solvable(*p)]:
        for ops in map("".join, itertools.permutations(countdown.OPS)):
            trace = countdown.search_trace(*p, style="compact", ops=ops)
            counts = answers.search_counts(p.nums, p.target, trace)
            assert counts["skipped_dead"] == counts["skipped_live"] == counts["process_errors"] == 0
            lines = trace.split("\n")
            miss = next((k for k, line in enumerate(lines) if "|" in line and not line.endswith(f"={p.target}|{p.target}")), None)
            if miss is None or miss + 1 < len(lines) and "|" not in lines[miss + 1] and "[" not in lines[miss + 1]:
                continue  # the last leaf of its state: no later move of the state shows it was passed over
            counts = answers.search_counts(p.nums, p.target, "\n".join(lines[:miss] + lines[miss + 1:]))
            assert (counts["skipped_dead"], counts["skipped_live"]) == (1, 0)
            checked += 1
    assert checked > 100


def test_reading_agrees_on_both_styles_and_a_reference_search_has_no_errors():
    for k, p in enumerate(_problems(80, seed=17)):
        for skip in (0.0, 0.3):
            compact = countdown.search_trace(*p, style="compact", skip=skip, rng=random.Random(k))
            longproc = countdown.search_trace(*p, style="longproc", skip=skip, rng=random.Random(k))
            a, b = answers.search_counts(*p, compact), answers.search_counts(*p, longproc)
            assert a == b and a["process_errors"] == 0
            assert a["lines"] == len(answers.extract_states(compact.split("<Solution>")[0]))
            if skip == 0:
                assert a["skipped_dead"] == a["skipped_live"] == 0


def test_wrong_restated_targets_missing_parents_and_broken_sets_are_errors():
    text = "+-*/\n7+5=12 [12,3,6]\n12+3=15 [15,6]\n15+6=21|41\n9+6=15 [15]\n6+3=9 [9,7,5]\n"
    lines = answers.read_search(NUMS, TARGET, text)
    # the leaf restates 41, not 42; "9+6=15 [15]" is a one-number set from a 2-number state that
    # holds no 9; [9,7,5] continues the problem's numbers (6+3 is legal and its child is right)
    assert [line.legal for line in lines] == [True, True, False, False, True]
    assert answers.read_search((1, 2), 3, "5+1=6 [6,2]\n")[0].parent is None  # no 3-number state was written


def test_legality_through_the_one_enumeration_equals_the_rules_written_out():
    """answers._legal reads countdown.legal_moves; here the rules are written out by hand (both
    numbers taken from the parent, the written arithmetic exact and below MAX_VALUE, the child the
    rest and the value, a leaf restating the target), on random moves, right and wrong."""
    import random

    def by_hand(parent, move, child, restated, target):
        a, op, b, value = move
        rest = list(parent)
        for x in (a, b):
            if x not in rest:
                return False
            rest.remove(x)
        if countdown.whole_result(a, b, op) != value or not 0 <= value < countdown.MAX_VALUE:
            return False
        return (len(child) > 1 or restated == target) and sorted(child) == sorted(rest + [value])
    rng, legal = random.Random(0), 0
    for _ in range(20_000):
        parent = tuple(rng.choice([0, 1, 2, 3, 5, 6, 7, 12, 25, 50, 100]) for _ in range(rng.randint(2, 4)))
        a, b, op = rng.choice(parent + (4, 9)), rng.choice(parent + (4, 9)), rng.choice("+-*/")
        right = countdown.whole_result(a, b, op)
        value = right if right is not None and right >= 0 and rng.random() < 0.8 else rng.randint(0, 30)
        rest = list(parent)
        for x in (a, b):
            if x in rest:
                rest.remove(x)
        child = tuple(rest + [value if rng.random() < 0.8 else rng.randint(0, 30)])
        child = child[:-1] if rng.random() < 0.1 and len(child) > 1 else child
        restated = 24 if rng.random() < 0.8 else 7
        expected = by_hand(parent, (a, op, b, value), child, restated, 24)
        assert answers._legal(parent, (a, op, b, value), child, restated, 24) == expected, (parent, a, op, b, child)
        legal += expected
    assert 1_000 < legal < 19_000  # both kinds are drawn


def test_a_long_number_does_not_shift_the_legality_of_later_states():
    """A line whose set holds a 7-digit number is neither a state (extract_states) nor a move
    (read_search): both read a set with one pattern. When the move reader took that line and the
    state reader did not, every later state was matched to the wrong line and read illegal."""
    import rewards
    p = countdown.Problem((21, 16, 17, 26), 46)
    text = "+-*/\n21+16=37 [1234567,17,26]\n21+16=37 [37,17,26]\n37+17=54 [54,26]\n54-26=28|46\n"
    states = answers.extract_states(text)
    assert [s for _, s in states] == [[37, 17, 26], [54, 26], [28]]
    assert rewards.legal_states(answers.read_search(p.nums, p.target, text), states) == [True, True, True]

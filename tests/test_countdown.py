"""countdown.py against LongProc's reference outputs, brute force and independent references."""
import itertools
import random
import re

import pytest

import answers
import countdown
from problems import PRESETS, heldout_problems, load_problems, never_train_on, random_problem
from tests.fuzz import solution_corpus


# --- the search reproduces LongProc ---------------------------------------------------------

def test_search_trace_reproduces_longproc_byte_for_byte(longproc):
    mismatched = [i for i, x in enumerate(longproc) if countdown.search_trace(x["nums"], x["target"]) != x["demonstration"]]
    assert not mismatched, f"{len(mismatched)}/200 differ, first: problem {mismatched[:5]}"


def test_trace_tokens_matches_longproc_count(longproc):
    for x in longproc:
        assert abs(countdown.trace_tokens(x["demonstration"]) - x["num_search_tokens"]) <= 20


def test_search_trace_unsolvable_and_small_n():
    assert countdown.search_trace([1, 1], 5) is None
    two = countdown.search_trace([3, 4], 7)
    assert two.startswith("<Search Procedure>\nInitial number set: [3, 4], target: 7, just two numbers left.\n"
                          " |- Try 4 + 3 = 7. Evaluate 7 == 7, target found!\n</Search Procedure>")
    assert "Final step: 4 + 3 = 7\n\n" in two and countdown.verify([3, 4], 7, two)
    with pytest.raises(ValueError):
        countdown.search_trace([5], 5)


def test_search_trace_drop_rules_at_inner_levels():
    # 7 / 2 is dropped one level above the leaves; 50 * 49 exceeds 2000 there too
    trace = countdown.search_trace([7, 2, 1], 3)
    assert "  |- Try 7 / 2 = 3.5. 3.5 is a decimal, drop this branch.\n |- Pick two numbers (7, 1)" in trace
    assert "  |- Try 50 * 49 = 2450. 2450 exceeds the maximum" in countdown.search_trace([50, 49, 1, 1], 48)


def test_division_by_zero_gets_its_line_at_every_depth():
    """6 - 6 = 0 makes 0 a divisor later: at an inner level (the pair (48, 0) of [0, 48, 2], indent 4)
    and at the leaves (indent 5), after the pair's other operations, where x / y would stand."""
    trace = countdown.search_trace([6, 6, 48, 2], 47)
    inner = ("    |- Try 48 * 0 = 0. Add 0 to the number set. Current number set: [0, 2], target: 47, just two numbers left.\n"
             "     |- Try 2 + 0 = 2. Evaluate 2 != 47, drop this branch.\n"
             "     |- Try 2 - 0 = 2. Evaluate 2 != 47, drop this branch.\n"
             "     |- Try 2 * 0 = 0. Evaluate 0 != 47, drop this branch.\n"
             "     |- Try 2 / 0 (invalid operation). drop this branch.\n"
             "    |- Try 48 / 0 (invalid operation). drop this branch.\n"
             "   |- Pick two numbers (0, 2) (numbers left: [48]). Try possible operations.\n")
    assert inner in trace
    leaf = ("     |- Try 50 * 0 = 0. Evaluate 0 != 47, drop this branch.\n"
            "     |- Try 50 / 0 (invalid operation). drop this branch.\n"
            "    |- Try 48 - 2 = 46.")
    assert leaf in trace
    assert trace.count("(invalid operation)") == 8 and countdown.verify([6, 6, 48, 2], 47, trace)
    # three numbers: the leaf after 3 - 3 = 0, then the search goes on to 3 * 3
    zero = countdown.search_trace([3, 3, 5], 4)
    assert ("   |- Try 5 * 0 = 0. Evaluate 0 != 4, drop this branch.\n"
            "   |- Try 5 / 0 (invalid operation). drop this branch.\n  |- Try 3 * 3 = 9.") in zero


def test_division_by_zero_lines_are_not_states_and_compact_skips_them():
    """The line leads to no set: extract_states reads the same states search_states lists, and the
    compact style (one line per legal operation) writes nothing for it."""
    nums, target = [6, 6, 48, 2], 47
    written = [tuple(s) for _, s in answers.extract_states(countdown.search_trace(nums, target))]
    assert written == [s for s, _ in countdown.search_states(nums, target)]
    compact = countdown.search_trace(nums, target, style="compact")
    assert "/0" not in compact and "invalid" not in compact
    assert [tuple(s) for _, s in answers.extract_states(compact)] == written


def test_search_trace_is_a_dfs_for_larger_n():
    for nums, target in [([2, 3, 5, 7, 11], 13), ([1, 2, 3, 4, 5, 6], 21)]:
        trace = countdown.search_trace(nums, target)
        assert countdown.verify(nums, target, trace)
        assert trace.count("The step before") == len(nums) - 3


# --- the oracle -----------------------------------------------------------------------------

def _brute_force(nums, target):
    """Independent exhaustive search over ordered pairs, no memo, no larger-first rule."""
    if len(nums) == 1:
        return nums[0] == target
    for i in range(len(nums)):
        for j in range(len(nums)):
            if i == j:
                continue
            a, b = nums[i], nums[j]
            rest = [x for k, x in enumerate(nums) if k not in (i, j)]
            values = [a + b, a - b, a * b] + ([a // b] if b and a % b == 0 else [])
            if any(0 <= v < 2000 and _brute_force(rest + [v], target) for v in values):
                return True
    return False


@pytest.mark.parametrize("n", [3, 4])
def test_solvable_agrees_with_search(n):
    rng = random.Random(n)
    agree = 0
    for _ in range(2000):
        nums, target = [rng.randint(1, 49) for _ in range(n)], rng.randint(10, 50)
        assert countdown.solvable(nums, target) == (countdown.search_trace(nums, target) is not None), (nums, target)
        agree += 1
    assert agree == 2000


def test_solvable_agrees_with_brute_force():
    rng = random.Random(7)
    for _ in range(300):
        nums, target = [rng.randint(0, 12) for _ in range(rng.choice([2, 3, 4]))], rng.randint(0, 30)
        assert countdown.solvable(nums, target) == _brute_force(nums, target), (nums, target)


# --- verify ---------------------------------------------------------------------------------

def _block(lines):
    return "<Solution>\n" + "\n".join(lines) + "\n</Solution>"


def test_longproc_solutions_verify_and_single_changes_do_not(longproc):
    checked = 0
    for x in longproc:
        for lines in (x["solution"], x["solution_text"].split("\n")):
            assert countdown.verify(x["nums"], x["target"], _block(lines)), lines
            text = "\n".join(lines)
            for m in re.finditer(r"\d+", text):
                for new in {int(m[0]) + 1, max(0, int(m[0]) - 1), 0}:
                    if new != int(m[0]):
                        changed = text[:m.start()] + str(new) + text[m.end():]
                        assert not countdown.verify(x["nums"], x["target"], _block([changed])), changed
                        checked += 1
    assert checked > 400 * 9 * 2


def _reference_verify(nums, target, text):
    """Independent slow reference: a character-level scan of the first block."""
    if "<Solution>" not in text:
        return False
    inside = text.split("<Solution>", 1)[1]
    if "</Solution>" not in inside:
        return False
    pool = list(nums)
    steps = 0
    for line in inside.split("</Solution>", 1)[0].split("\n"):
        tokens, digits = [], ""
        for ch in line + " ":
            if ch in "0123456789":
                digits += ch
                continue
            if digits:
                tokens.append(digits)
                digits = ""
            if ch in "+-*/=":
                tokens.append(ch)
            elif ch not in " \t\r\x0b\x0c":
                return False
        if not tokens:
            continue
        if len(tokens) != 5 or tokens[3] != "=" or tokens[1] not in "+-*/" or tokens[1] == "":
            return False
        if not all(tokens[k].isdigit() and len(tokens[k]) <= 6 for k in (0, 2, 4)):
            return False
        a, op, b, c = int(tokens[0]), tokens[1], int(tokens[2]), int(tokens[4])
        if op == "+":
            value = a + b
        elif op == "-":
            value = a - b
        elif op == "*":
            value = a * b
        else:
            if b == 0 or a % b:
                return False
            value = a // b
        if value != c or not 0 <= c < 2000:
            return False
        for x in (a, b):
            if x not in pool:
                return False
            pool.remove(x)
        pool.append(c)
        steps += 1
    return steps == len(nums) - 1 and pool == [target]


def test_verify_fuzz_matches_reference():
    corpus = solution_corpus(seed=0, size=10_000)
    verdicts = [countdown.verify(nums, target, text) for nums, target, text in corpus]
    assert all(type(v) is bool for v in verdicts)
    for (nums, target, text), got in zip(corpus, verdicts):
        if len(text) < 10_000:  # the reference is too slow for the 1 MB inputs
            assert got == _reference_verify(nums, target, text), (nums, target, text[:300])
    assert 0.15 < sum(verdicts) / len(verdicts) < 0.5  # the corpus holds both verdicts in bulk
    assert not any(verdicts[-4:])


def test_verify_first_block_only_and_rules():
    good = "21 + 16 = 37\n37 - 17 = 20\n26 + 20 = 46"
    nums, target = [21, 16, 17, 26], 46
    assert countdown.verify(nums, target, f"<Solution>\n{good}\n</Solution>")
    assert not countdown.verify(nums, target, f"<Solution>\n</Solution><Solution>\n{good}\n</Solution>")
    assert not countdown.verify(nums, target, f"<Solution>\n{good}\n")
    assert not countdown.verify([4, 2, 1], 1, "<Solution>\n2 - 4 = -2\n1 + 2 = 3\n</Solution>")
    assert not countdown.verify([7, 2, 1], 4, "<Solution>\n7 / 2 = 3\n3 + 1 = 4\n</Solution>")
    assert not countdown.verify([50, 40, 1], 2001, "<Solution>\n50 * 40 = 2000\n2000 + 1 = 2001\n</Solution>")
    assert countdown.verify([5, 0, 3], 3, "<Solution>\n5 * 0 = 0\n0 + 3 = 3\n</Solution>")
    assert not countdown.verify([5, 0, 3], 3, "<Solution>\n5 / 0 = 0\n0 + 3 = 3\n</Solution>")


# --- states, problems, files, prompts -------------------------------------------------------

def test_extract_states_hand_case():
    text = ("  |- Try 21 + 16 = 37. Add 37 to the number set. Current number set: [37, 17, 26], target: 46. \n"
            "     |- Try 54 + 26 = 80. Evaluate 80 != 46, drop this branch.\n"
            "Current number set: [3, x] Current number set: [ 5,6 ] Evaluate 46 == 46")
    states = answers.extract_states(text)
    assert [s for _, s in states] == [[37, 17, 26], [80], [5, 6], [46]]
    assert [text[o] for o, _ in states] == ["]", "0", "]", "6"]
    assert states[0][0] == text.index("26]") + 2
    compact = "12+3=15 [15,7]\n15-7=8|8\n 1+2=3|3\n15*7=105 x\n7/1=7 [7,\n<Solution>\n12 + 3 = 15\n</Solution>"
    states = answers.extract_states(compact)
    assert [s for _, s in states] == [[15, 7], [8]]
    assert [o for o, _ in states] == [compact.index("7]") + 1, compact.index("=8") + 1]


def test_compact_trace_is_the_same_search():
    rng = random.Random(11)
    for _ in range(200):
        p = random_problem(rng)
        long, compact = countdown.search_trace(*p), countdown.search_trace(*p, style="compact")
        assert countdown.verify(p.nums, p.target, compact)
        assert countdown.solution_block(long) == countdown.solution_block(compact)
        # the same states in the same order: LongProc's "Current number set" / "Evaluate" lines
        assert [s for _, s in answers.extract_states(long)] == [s for _, s in answers.extract_states(compact)]
    text = countdown.search_trace([21, 16, 17, 26], 46, style="compact")
    assert text.startswith("+-*/\n21+16=37 [37,17,26]\n37+17=54 [54,26]\n54+26=80|46\n54-26=28|46\n54*26=1404|46\n")
    assert text.endswith("26+20=46|46\n<Solution>\n21 + 16 = 37\n37 - 17 = 20\n26 + 20 = 46\n</Solution>\n")
    with pytest.raises(ValueError, match="style"):
        countdown.search_trace([1, 2], 3, style="short")


def _first_solution_by_brute_force(nums, target, ops):
    """The first solution a depth-first search meets when pairs go in list order (i < j, the new
    number first in the child) and operations in the order `ops`, the larger number first: an
    independent enumeration of the same order."""
    if len(nums) == 1:
        return [] if nums[0] == target else None
    for i, j in itertools.combinations(range(len(nums)), 2):
        big, small = max(nums[i], nums[j]), min(nums[i], nums[j])
        rest = [x for k, x in enumerate(nums) if k not in (i, j)]
        for op in ops:
            value = {"+": big + small, "-": big - small, "*": big * small,
                     "/": big // small if small and big % small == 0 else None}[op]
            if value is None or value >= countdown.MAX_VALUE:
                continue
            below = _first_solution_by_brute_force([value] + rest, target, ops)
            if below is not None:
                return [(big, op, small, value)] + below
    return None


def test_each_operation_order_announces_itself_and_searches_in_it():
    rng = random.Random(5)
    for ops in (countdown.OPS, "+*/-", "*/-+"):
        for _ in range(100):
            p = random_problem(rng, **PRESETS["tiny"])
            trace = countdown.search_trace(*p, style="compact", ops=ops)
            assert trace.split("\n", 1)[0] == ops
            expected = _first_solution_by_brute_force(list(p.nums), p.target, ops)
            block = "".join(f"{a} {op} {b} = {v}\n" for a, op, b, v in expected)
            assert countdown.solution_block(trace) == "\n" + block and countdown.verify(p.nums, p.target, trace)
    with pytest.raises(ValueError, match="order each"):
        countdown.search_trace([1, 2], 3, style="compact", ops="++-/")


def test_what_became_of_an_answer():
    nums, target = (3, 4, 5, 6), 18
    solved = countdown.search_trace(nums, target, style="compact")
    guess = "+-*/\n4+3=7 [7,5,6]\n7+5=12 [12,6]\n12+6=18|19\n<Solution>\n4 + 3 = 7\n7 + 5 = 12\n12 + 6 = 18\n</Solution>\n"
    assert answers.failure(nums, target, solved, True) == "solved" and answers.wrote_found_leaf(solved, target)
    assert answers.failure(nums, 19, guess, True) == "guess"  # its only leaf missed 19
    slip = guess.replace("12+6=18|19", "12+7=19|19")  # the search claims the hit, the block is wrong
    assert answers.failure(nums, 19, slip, True) == "slip" and answers.wrote_found_leaf(slip, 19)
    assert answers.failure(nums, target, solved[:40], False) == "out of tokens"
    assert answers.failure(nums, target, solved[:40], True) == "no block"
    long = countdown.search_trace([21, 16, 17, 26], 46)
    assert answers.wrote_found_leaf(long, 46) and not answers.wrote_found_leaf(long, 47)
    # a hit written after the block does not count
    assert not answers.wrote_found_leaf(guess + "12+7=19|19\n", 19)


def test_search_states_and_their_reached_values():
    states = countdown.search_states([21, 16, 17, 26], 46)
    assert states == [((37, 17, 26), {28, 46, 80, 1404}), ((54, 26), {28, 80, 1404}), ((80,), {80}), ((28,), {28}),
                      ((1404,), {1404}), ((20, 26), {46}), ((46,), {46})]
    rng = random.Random(5)
    for _ in range(100):  # every reached value is truly reachable (the oracle agrees)
        p = random_problem(rng)
        for numbers, reached in countdown.search_states(*p):
            assert reached and reached <= countdown.reachable_values(tuple(sorted(numbers)))


def test_extract_states_on_longproc(longproc):
    for x in longproc[:50]:
        demo = x["demonstration"]
        states = answers.extract_states(demo)
        assert len(states) == demo.count("Current number set") + demo.count("Evaluate")
        assert states[-1][1] == [x["target"]]
        offsets = [o for o, _ in states]
        assert offsets == sorted(offsets)
        for _, s in states:  # every state the reference search writes is reachable from the start
            assert all(v in countdown.reachable_values(tuple(sorted(x["nums"]))) or len(s) > 1 for v in s)


def test_random_problem_distribution_determinism_and_exclusion(longproc):
    held_out = {countdown.problem_key(x["nums"], x["target"]) for x in longproc}
    a = [random_problem(random.Random(3), tokens=(330, 510), exclude=held_out) for _ in range(2)]
    assert a[0] == a[1]
    rng = random.Random(4)
    for _ in range(40):
        p = random_problem(rng, tokens=(330, 510), exclude=held_out)
        assert countdown.problem_key(*p) not in held_out
        assert all(1 <= x <= 49 for x in p.nums) and 10 <= p.target <= 50 and len(p.nums) == 4
        assert 330 <= countdown.trace_tokens(countdown.search_trace(*p)) <= 510
    # a tiny space where most problems are excluded: the rest are still found, never the excluded
    space = {countdown.problem_key((a, b), t) for a in range(1, 4) for b in range(1, 4) for t in range(1, 7)}
    keep = sorted(space)[:3]
    exclude = space - set(keep)
    for _ in range(50):
        p = random_problem(rng, n=2, num_range=(1, 3), target_range=(1, 6), exclude=exclude)
        assert countdown.problem_key(*p) not in exclude


def _drawn_slowly(rng, n, num_range, target_range, tokens):
    """random_problem by its definition: every candidate searched and written out in full."""
    while True:
        nums, target = tuple(rng.randint(*num_range) for _ in range(n)), rng.randint(*target_range)
        if countdown.solvable(nums, target):
            if tokens[0] <= countdown.trace_tokens(countdown.search_trace(nums, target)) <= tokens[1]:
                return countdown.Problem(nums, target)


@pytest.mark.parametrize("preset,tokens", [("tiny", None), ("longproc", None), ("longproc", (1080, 2050)),
                                           ("tiny", (0, 330))])
def test_drawing_under_a_token_bound_stops_searches_early_and_draws_the_same_problems(preset, tokens):
    """solved_within stops a search whose lines alone pass the bound: the draws must be those
    of the definition, candidate for candidate (the held-out streams and every run's problems)."""
    kwargs = {**PRESETS[preset], **({"tokens": tokens} if tokens else {})}
    fast, slow = random.Random(11), random.Random(11)
    for _ in range(25):
        assert random_problem(fast, **kwargs) == _drawn_slowly(slow, **kwargs)
    # its premise: no line of a search log is shorter than SHORTEST_LINE characters with its newline
    for nums, target in ((p.nums, p.target) for p in heldout_problems(200, preset)):
        trace = countdown.search_trace(nums, target)
        log = trace.split("<Search Procedure>\n")[1].split("\n</Search Procedure>")[0].splitlines()[1:]
        assert min(len(line) + 1 for line in log) >= countdown.SHORTEST_LINE


def test_never_train_on_covers_longproc_and_the_held_out_stream(longproc):
    test_split = {countdown.problem_key(x["nums"], x["target"]) for x in longproc}
    assert len(test_split) > 150
    for preset in PRESETS:
        keys = never_train_on(preset)
        assert test_split <= keys
        assert {countdown.problem_key(*p) for p in heldout_problems(1000, preset)} <= keys


def test_random_problem_impossible_range_raises():
    with pytest.raises(ValueError, match="no solvable problem"):
        random_problem(random.Random(0), n=2, num_range=(1, 1), target_range=(5, 5))


def test_load_problems(tmp_path, longproc_path):
    problems = load_problems(longproc_path)
    assert len(problems) == 200 and problems[0] == countdown.Problem((21, 16, 17, 26), 46)
    good = tmp_path / "p.jsonl"
    good.write_text('{"nums": [1, 2], "target": 3}\n\n{"nums": [4, 5, 6], "target": 15, "id": 9}\n')
    assert load_problems(good) == [countdown.Problem((1, 2), 3), countdown.Problem((4, 5, 6), 15)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"nums": [1, 2], "target": 3}\n{"nums": [1], "target": 3}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl: record 2"):
        load_problems(bad)
    bad.write_text('{"nums": [1, 2], "target": 3}\n{"nums": [1, 2], "target": "3"}\n')
    with pytest.raises(ValueError, match="record 2"):
        load_problems(bad)
    bad.write_text('{"nums": [1, 2], "target": 3}\n{"nums": [1, 2]')
    with pytest.raises(ValueError, match=r"bad\.jsonl: not JSON"):
        load_problems(bad)
    with pytest.raises(ValueError, match="cannot read"):
        load_problems(tmp_path / "missing.json")


def test_prompts(longproc):
    held_out = {countdown.problem_key(x["nums"], x["target"]) for x in longproc}
    assert countdown.problem_key(*countdown._EXAMPLE) not in held_out
    p = countdown.Problem((21, 16, 17, 26), 46)
    assert countdown.prompt(p, "bare") == "Numbers: [21, 16, 17, 26]\nTarget: 46\n"
    long = countdown.prompt(p, "longproc")
    assert long.endswith("Numbers: [21, 16, 17, 26]\nTarget: 46\n") and "<Solution>" in long
    with pytest.raises(ValueError):
        countdown.prompt(p, "fancy")

"""Countdown, the task: the rules, the reference search, prompts, verification, the oracle.

Combine all n given numbers with + - * / into the target; every intermediate result must be
a whole number in [0, 2000). A model writes a verbalised depth-first search (LongProc format),
a trace-back, then a <Solution> block of n-1 equations.

    python countdown.py 21 16 17 26 46        # print the reference search for one problem
    python -m pytest tests/test_countdown.py  # its checks, incl. LongProc byte-for-byte

Plain functions, standard library only (no torch): everything else imports this file,
this file imports nothing of ours. Where problems come from (the presets, the held-out
problems, files): problems.py.
"""
import functools
import re
from typing import NamedTuple

MAX_VALUE = 2000  # results must stay below this (LongProc's "maximum intermediate result")
OPS = "+-*/"  # the order in which LongProc's search tries operations
NO_SOLUTION = "No solution found."  # how a written search that found nothing ends (skipping demonstrations)


class Problem(NamedTuple):
    nums: tuple
    target: int


def problem_key(nums, target):
    """Order-free identity of a problem: used to keep held-out problems out of training."""
    return tuple(sorted(nums)), target


# ---------------------------------------------------------------------------------------------
# Arithmetic shared by the search, the oracle and the verifier

def whole_result(a, b, op):
    """a op b for whole numbers a, b if it is a whole number, else None (x / 0, inexact /)."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    return a // b if b and a % b == 0 else None


# ---------------------------------------------------------------------------------------------
# The reference search (LongProc's depth-first search) and the two ways to write it down

class Step(NamedTuple):
    """One event of the search. kind: "pick" (a pair is chosen; a, b in list order) or "try"
    (big op small; outcome "invalid" (x / 0), "decimal", "exceeds", "miss", "found" or "state",
    child = new set; or "skipped": a legal move the search passed over, written by neither style)."""
    kind: str
    depth: int
    a: int
    b: int
    op: str = ""
    value: object = None
    outcome: str = ""
    child: tuple = ()


def _search(nums, target, depth, steps, path, ops=OPS, skip=None):
    """Depth-first search below the state `nums`, whose own line sits at indent `depth`, trying
    the operations on a pair in the order `ops`.

    Appends Steps; on success leaves the winning (big, op, small, value) in `path` and returns
    True. A state of more than two numbers picks pairs first; a state of two numbers tries the
    operations on its only pair directly. skip: None, or a function called once per legal move,
    before the move's outcome is looked at; True passes the move over (no line, no subtree).
    """
    n = len(nums)
    for i in range(n):
        for j in range(i + 1, n):
            rest = tuple(nums[k] for k in range(n) if k != i and k != j)
            try_depth = depth + 1
            if n > 2:
                steps.append(Step("pick", depth + 1, nums[i], nums[j], child=rest))
                try_depth = depth + 2
            big, small = max(nums[i], nums[j]), min(nums[i], nums[j])
            for op in ops:
                if op == "/" and small == 0:  # LongProc writes this line too, at every depth
                    steps.append(Step("try", try_depth, big, small, op, None, "invalid"))
                    continue
                value = whole_result(big, small, op)
                if value is None:
                    steps.append(Step("try", try_depth, big, small, op, big / small, "decimal"))
                    continue
                if value >= MAX_VALUE:  # larger number first: results are never negative
                    steps.append(Step("try", try_depth, big, small, op, value, "exceeds"))
                    continue
                if skip is not None and skip():  # drawn before the outcome is known: blind to the target
                    steps.append(Step("try", try_depth, big, small, op, value, "skipped", (value,) + rest))
                    continue
                path.append((big, op, small, value))
                if not rest:
                    found = value == target
                    steps.append(Step("try", try_depth, big, small, op, value, "found" if found else "miss", (value,)))
                    if found:
                        return True
                else:
                    child = (value,) + rest
                    steps.append(Step("try", try_depth, big, small, op, value, "state", child))
                    if _search(child, target, try_depth, steps, path, ops, skip):
                        return True
                path.pop()
    return False


def _fmt_list(nums):
    return "[" + ", ".join(str(x) for x in nums) + "]"


def _state_text(nums, target):
    if len(nums) == 2:
        return f"{_fmt_list(nums)}, target: {target}, just two numbers left."
    pairs = ", ".join(f"({nums[i]}, {nums[j]})" for i in range(len(nums)) for j in range(i + 1, len(nums)))
    return f"{_fmt_list(nums)}, target: {target}. Options for choosing two numbers: [{pairs}]."


def _longproc_line(step, target):
    indent = " " * step.depth
    if step.kind == "pick":
        return (f"{indent}|- Pick two numbers ({step.a}, {step.b}) (numbers left: {_fmt_list(step.child)}). "
                "Try possible operations.")
    if step.outcome == "invalid":
        return f"{indent}|- Try {step.a} / {step.b} (invalid operation). drop this branch."
    if step.outcome == "decimal":
        shown = f"{step.value:.1f}"
        return f"{indent}|- Try {step.a} / {step.b} = {shown}. {shown} is a decimal, drop this branch."
    head = f"{indent}|- Try {step.a} {step.op} {step.b} = {step.value}."
    if step.outcome == "exceeds":
        return f"{head} {step.value} exceeds the maximum intermediate result, drop this branch."
    if step.outcome == "miss":
        return f"{head} Evaluate {step.value} != {target}, drop this branch."
    if step.outcome == "found":
        return f"{head} Evaluate {step.value} == {target}, target found!"
    return f"{head} Add {step.value} to the number set. Current number set: {_state_text(step.child, target)}"


def _compact_line(step, target):
    line = f"{step.a}{step.op}{step.b}={step.value}"
    if len(step.child) == 1:  # a leaf restates the target: the model compares two adjacent numbers
        return f"{line}|{target}"
    return f"{line} [{','.join(str(x) for x in step.child)}]"


STYLES = ("longproc", "compact")


def search_trace(nums, target, style="longproc", ops=OPS, skip=0.0, rng=None):
    """The written search for a problem, or None when it has no solution.

    "longproc": LongProc's demonstration (search log, trace-back, <Solution>), byte for byte.
    "compact": the same search, announced by its operation order in the first line, then one
    line per legal operation with the set it leads to (`21+16=37 [37,17,26]`; a leaf restates
    the target: `54+26=80|46`), then <Solution>. Operations without a legal result (x / 0,
    decimals, results past the maximum) get no line there, as they lead to no set. ~7x
    shorter: the format the built-in tiny model learns.
    ops: the order in which every node tries + - * / (LongProc's is OPS).
    skip: each legal move (a line that leads to a set, leaves included) is passed over, with its
    subtree, with this probability, drawn from `rng` (a random.Random) one move at a time before
    its outcome is looked at: the noise never depends on where the solution is. A search that
    passes over every solution writes what it searched, then NO_SOLUTION, and no <Solution>.
    """
    nums = list(nums)
    if len(nums) < 2:
        raise ValueError(f"Countdown needs at least 2 numbers, got {nums}")
    if style not in STYLES:
        raise ValueError(f"unknown trace style {style!r}: expected one of {STYLES}")
    if sorted(ops) != sorted(OPS):
        raise ValueError(f"ops {ops!r} must order each of {OPS} once")
    if skip and rng is None:
        raise ValueError("skip > 0 needs rng=, a random.Random to draw the skips from")
    steps, path = [], []
    found = _search(nums, target, 0, steps, path, ops, (lambda: rng.random() < skip) if skip else None)
    if not found and not (skip and solvable(nums, target)):
        return None
    written = [s for s in steps if s.outcome != "skipped"]
    if style == "compact":
        lines = [ops] + [_compact_line(s, target) for s in written if s.kind == "try" and s.child]
        end = "<Solution>\n" + "".join(f"{a} {op} {b} = {v}\n" for a, op, b, v in path) + "</Solution>"
        return "\n".join(lines) + "\n" + (end if found else NO_SOLUTION) + "\n"
    lines = [f"Initial number set: {_state_text(nums, target)}"] + [_longproc_line(s, target) for s in written]
    search = "<Search Procedure>\n" + "\n".join(lines) + "\n</Search Procedure>\n\n"
    if not found:
        return search + NO_SOLUTION + "\n"
    equations = [f"{a} {op} {b} = {v}" for a, op, b, v in path]
    names = ["Final step"] + ["The step before"] * (len(path) - 2) + ["The first step"] * (len(path) > 1)
    traceback = [f"{name}: {eq}" for name, eq in zip(names, reversed(equations))]
    return (search + "Now we have found the target, let's trace back the solution:\n" + "\n".join(traceback) + "\n\n"
            "Output the solution in the required format:\n<Solution>\n" + "\n".join(equations) + "\n</Solution>\n")


def search_states(nums, target):
    """The states the reference search writes, in order, each with the final values it reached
    below them: [(numbers, reached)], numbers a tuple as written (the new number first),
    reached a frozenset (a leaf reaches its own value). Without the initial numbers; for an
    unsolvable problem, the states of the whole failed search."""
    steps, path = [], []
    _search(list(nums), target, 0, steps, path)
    states = [(s.depth, s.child) for s in steps if s.kind == "try" and s.child]
    out = []
    for k, (depth, child) in enumerate(states):
        reached = {child[0]} if len(child) == 1 else set()
        for d, c in states[k + 1:]:
            if d <= depth:
                break
            if len(c) == 1:
                reached.add(c[0])
        out.append((child, frozenset(reached)))
    return out


def trace_tokens(trace):
    """LongProc's token count of a demonstration, estimated from its length in characters.

    LongProc sizes its splits by `num_search_tokens` (0.5k: ~330-510). Its tokenizer is not a
    dependency of ours; 0.36 tokens per character matches that field within 16 tokens on all
    200 problems of the 0.5k split (checked in tests).
    """
    return round(TOKENS_PER_CHARACTER * len(trace))


TOKENS_PER_CHARACTER = 0.36
SHORTEST_LINE = 50  # characters of a search line, newline in: ` |- Try 0 + 0 = 0. Evaluate 0 == 0, target found!`


class _Overlong(Exception):
    pass


class _StepBudget(list):
    """A search's steps, stopped (_Overlong) at the first one past `most`."""

    def __init__(self, most):
        super().__init__()
        self.most = most

    def append(self, step):
        if len(self) == self.most:
            raise _Overlong
        super().append(step)


def solved_within(nums, target, most):
    """Whether the LongProc search reaches `target` before its trace could pass `most` tokens. It
    stops once it has written more lines than that many tokens hold (each at least SHORTEST_LINE
    characters), before any text is built: a problem drawn under a token bound is solvable with a
    trace this short or rejected, so most rejections cost a few dozen steps (random_problem)."""
    try:
        lines = int((most + 0.5) / (TOKENS_PER_CHARACTER * SHORTEST_LINE))  # more lines: more than `most` tokens
        return _search(list(nums), target, 0, _StepBudget(lines), [])
    except _Overlong:
        return False


# ---------------------------------------------------------------------------------------------
# The exact oracle

def legal_moves(nums, ops=OPS):
    """Every legal move of the state `nums`, in the reference search's order (pairs, then `ops`):
    [(big, op, small, child)], child the result first, then the other numbers in order. The one
    enumeration of moves: next_states, the oracle and answers.passed_over read it."""
    out = []
    for i in range(len(nums)):
        for j in range(i + 1, len(nums)):
            rest = tuple(nums[k] for k in range(len(nums)) if k not in (i, j))
            big, small = max(nums[i], nums[j]), min(nums[i], nums[j])
            for op in ops:
                value = whole_result(big, small, op)
                if value is not None and value < MAX_VALUE:
                    out.append((big, op, small, (value,) + rest))
    return out


@functools.lru_cache(maxsize=1 << 17)
def next_states(nums):
    """Every distinct state one legal move from the sorted tuple `nums`, as sorted tuples (memoised)."""
    return frozenset(tuple(sorted(child)) for *_, child in legal_moves(nums))


@functools.lru_cache(maxsize=1 << 17)
def reachable_values(nums):
    """Every final value reachable from the sorted tuple `nums` under the rules (memoised)."""
    if len(nums) == 1:
        return frozenset(nums)
    return frozenset().union(*(reachable_values(state) for state in next_states(nums)))


def solvable(nums, target):
    """Can `target` be reached from the numbers `nums` (a problem, or any intermediate state)?"""
    return target in reachable_values(tuple(sorted(nums)))


# ---------------------------------------------------------------------------------------------
# Outcome rewards: never raise, never evaluate text as code, linear time in the input

_EQUATION = re.compile(r"\s*([0-9]{1,6})\s*([-+*/])\s*([0-9]{1,6})\s*=\s*([0-9]{1,6})\s*", re.ASCII)


def solution_block(completion):
    """Text of the FIRST <Solution>...</Solution> block, or None."""
    start = completion.find("<Solution>")
    if start < 0:
        return None
    start += len("<Solution>")
    end = completion.find("</Solution>", start)
    return None if end < 0 else completion[start:end]


def _solution_lines(completion, n):
    """The non-blank lines of the first <Solution> block if there are n-1 and each is an
    equation `a op b = c`: [(a, op, b, c)]; else None."""
    block = solution_block(completion)
    if block is None:
        return None
    # bounded split: a block of a million lines costs no more than one of n lines
    lines = [line for line in block.split("\n", 4 * n + 16) if line.strip()]
    if len(lines) != n - 1:
        return None
    equations = [_EQUATION.fullmatch(line) for line in lines]
    if not all(equations):
        return None
    return [(int(m[1]), m[2], int(m[3]), int(m[4])) for m in equations]


def solution_format_ok(completion, n):
    """Does the first <Solution> block hold n-1 equations `a op b = c` (right or wrong)?"""
    return _solution_lines(completion, n) is not None


def verify(nums, target, completion):
    """True iff the first <Solution> block derives `target` from `nums` in n-1 legal steps.

    Each line is `a op b = c` (spaces optional); a and b are taken out of the current multiset
    (given numbers plus earlier results), c must equal a op b exactly and be a whole number in
    [0, 2000), and after the last line only the target is left. Blank lines are ignored.
    """
    equations = _solution_lines(completion, len(nums))
    if equations is None:
        return False
    pool = list(nums)
    for a, op, b, c in equations:
        for x in (a, b):
            if x not in pool:
                return False
            pool.remove(x)
        if whole_result(a, b, op) != c or c >= MAX_VALUE:
            return False
        pool.append(c)
    return pool == [target]


# ---------------------------------------------------------------------------------------------
# Prompts

_EXAMPLE = Problem((7, 3, 12, 25), 50)  # not a LongProc test problem (checked in tests)

_INSTRUCTION = """\
Let's play Countdown. You get a few numbers and a target. Combine all of the numbers, each \
exactly once, with addition, subtraction, multiplication and division so that the final result \
is the target. Work two numbers at a time: pick two, replace them with the result of one \
operation, and go on until one number is left. Every intermediate result has to be a whole \
number below 2000.

Search for a solution depth first and write every step down: list the pairs you can pick, try \
+ - * / on a pair with the larger number first, and drop a branch as soon as a result is a \
fraction or too large, or when the last number misses the target. Once you hit the target, \
trace the steps back and write the solution as a <Solution> block, one equation per line.
"""



def problem_header(problem):
    return f"Numbers: {_fmt_list(problem.nums)}\nTarget: {problem.target}\n"


def prompt(problem, style="bare"):
    """The user-side text for a problem: "bare" (header only, for models trained on traces)
    or "longproc" (instruction, a worked example, the problem; wrap it in a chat template)."""
    if style == "bare":
        return problem_header(problem)
    if style == "longproc":
        example = problem_header(_EXAMPLE) + search_trace(*_EXAMPLE)
        return f"{_INSTRUCTION}\nHere is a worked example.\n\n{example}\nNow solve this one.\n\n{problem_header(problem)}"
    raise ValueError(f"unknown prompt style {style!r}: expected 'bare' or 'longproc'")


if __name__ == "__main__":
    import sys
    if len(sys.argv) < 4:
        sys.exit("usage: python countdown.py NUM NUM [NUM ...] TARGET")
    *numbers, goal = (int(x) for x in sys.argv[1:])
    print(search_trace(numbers, goal) or f"{numbers} cannot reach {goal}")

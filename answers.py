"""What a model's answer holds, read back: the states it reaches, each written move checked
against the rules, what the search passed over, and what became of the answer.

    from answers import extract_states, failure, read_search, search_counts
    extract_states(text)                         # [(offset, numbers)]: where the reward terms credit
    failure(nums, target, text, finished)        # "solved", "out of tokens", "no block", "guess", "slip"
    lines = read_search(nums, target, text)      # [Line]: each written move, its parent, legal?, reaches?
    search_counts(nums, target, text)            # {"lines", "leaf_misses", "dead_pairs", "process_errors", ...}
    python -m pytest tests/test_answers.py       # hand-built traces against the counts

Both written styles are read: the compact lines (`7+5=12 [12,3,6]`, a leaf `15+6=21|42`) and
LongProc's (`|- Try 7 + 5 = 12. Add 12 to the number set. Current number set: [12, 3, 6], ...`,
a leaf `|- Try 15 + 6 = 21. Evaluate 21 != 42, drop this branch.`). Neither style writes which
state a line continues; a depth-first search makes it the newest state written with one number
more (the problem's numbers for a first move). Only the search before the first <Solution> is
read. Plain functions, standard library and countdown only (no torch).
"""
import re
from typing import NamedTuple

import countdown

# ---------------------------------------------------------------------------------------------
# What became of an answer

_FOUND_LEAF = re.compile(r"^[0-9]{1,6}[-+*/][0-9]{1,6}=([0-9]{1,6})\|[0-9]{1,6}$"
                         r"|Evaluate ([0-9]{1,6}) == [0-9]{1,6}, target found!", re.ASCII | re.MULTILINE)
FAILURES = ("solved", "out of tokens", "no block", "guess", "slip")


def wrote_found_leaf(completion, target):
    """Whether the search written before the first <Solution> has a leaf whose value is the
    target (compact `38+8=46|46`, or LongProc's `Evaluate 46 == 46, target found!`)."""
    head = completion.split("<Solution>", 1)[0]
    return any(int(m[1] or m[2]) == target for m in _FOUND_LEAF.finditer(head))


def blind_answer(completion, lines):
    """Whether the completion writes a <Solution> block although its search (`lines`:
    read_search of it) never reached the target by a legal move: a guess, verified or not, or a
    block after a fabricated hit. The reward terms give such an answer's states no credit."""
    return "<Solution>" in completion and not any(
        line.legal and len(line.child) == 1 and line.reaches for line in lines)


def failure(nums, target, completion, finished):
    """What became of an answer, one of FAILURES: solved; out of tokens (the budget ended it);
    no block (it stopped without a parsable <Solution>, e.g. after countdown.NO_SOLUTION); guess
    (a block after a search that never hit the target: a stop at a miss, or no search at all);
    slip (the search hit the target, and the block is wrong anyway). `finished`: it stopped by
    itself (EOS, stop string)."""
    if countdown.verify(nums, target, completion):
        return "solved"
    if not finished:
        return "out of tokens"
    if not countdown.solution_format_ok(completion, len(nums)):
        return "no block"
    return "slip" if wrote_found_leaf(completion, target) else "guess"


# ---------------------------------------------------------------------------------------------
# The states it reached (where the critic's and the oracle's credits land)

_NUMBER_LIST = r"\[\s*([0-9]{1,6}(?:\s*,\s*[0-9]{1,6})*)\s*\]"
_STATE = re.compile(rf"(?:Current number set: |=[0-9]{{1,6}} ){_NUMBER_LIST}|Evaluate ([0-9]{{1,6}})\b"
                    r"|^[0-9]{1,6}[-+*/][0-9]{1,6}=([0-9]{1,6})\|", re.ASCII | re.MULTILINE)


def extract_states(completion):
    """[(offset, numbers)] for every state the completion reaches, in order of writing.

    A state is a `Current number set: [...]` or a leaf result (`Evaluate X ...`, the set [X])
    in the LongProc style; in the compact style, the set after `=X ` (`21+16=37 [37,17,26]`)
    or the result of a leaf line (`54+26=80|46`, the set [80]);
    `offset` is the index of the state's last character (the `]`, or X's last digit), so a
    reward placed there credits every token that wrote it. What does not parse is skipped.
    """
    states = []
    for m in _STATE.finditer(completion):
        if m[1] is not None:
            states.append((m.end() - 1, [int(x) for x in m[1].split(",")]))
        else:
            leaf = 2 if m[2] is not None else 3
            states.append((m.end(leaf) - 1, [int(m[leaf])]))
    return states


# ---------------------------------------------------------------------------------------------
# The written search, move by move

_N = "([0-9]{1,6})"
# a set is read with the same pattern as extract_states reads it: a line whose set one of them
# could not read (a 7-digit number) and the other could would shift every later state's legality
_MOVE = re.compile(
    rf"^{_N}([-+*/]){_N}={_N}(?: {_NUMBER_LIST}|\|{_N})$"                          # compact
    rf"|Try {_N} ([-+*/]) {_N} = {_N}\. (?:Add [0-9]{{1,6}} to the number set\. "  # LongProc
    rf"Current number set: {_NUMBER_LIST}|Evaluate [0-9]{{1,6}} [!=]= {_N}, )", re.ASCII | re.MULTILINE)


class Line(NamedTuple):
    """One written move."""
    parent: tuple   # the state it continues (see the module docstring), None when no such state was written
    move: tuple     # (a, op, b, value) as written
    child: tuple    # the numbers it leads to, as written ((value,) at a leaf)
    target: int     # the target a leaf restates (None on a line that leads to a set)
    legal: bool     # a legal move of `parent`, written right: a and b taken from it, value = a op b exactly
                    # and in [0, MAX_VALUE), child = value and the rest; a leaf restates the true target
    reaches: bool   # the exact oracle: the target can still be reached from `child` (a leaf: it is the target)


class OpenStates:
    """Which state a written line continues. Neither style writes it: a depth-first search makes
    it the newest state still open with one number more (the problem's numbers for a first
    move), and a line leading to k numbers leaves the subtrees of every open state of k numbers
    or fewer. The one reader of that order: read_search, passed_over and
    critic_data.written_rows keep what they need of each state (the state, its index, its
    reached values) as its `item`."""

    def __init__(self, size, item):
        self.items = {size: item}  # state size -> the item of the newest open state of that size

    def write(self, size):
        """A line leading to `size` numbers: (the item of the state it continues, or None; the
        items of the states whose subtrees it leaves)."""
        parent = self.items.get(size + 1)
        left = [self.items.pop(s) for s in [s for s in self.items if s <= size]]
        return parent, left

    def enter(self, size, item):
        """The line's state is open now (its moves come next)."""
        self.items[size] = item

    def open_items(self):
        return list(self.items.values())


def _legal(parent, move, child, restated, target):
    """A legal move of `parent` written right: its arithmetic as written is exact, and `child` is
    what a legal move (countdown.legal_moves) of the same two numbers to the same value leads to
    (any operand order: `3+5` is the move 5+3); a leaf restates the true target."""
    if parent is None:
        return False
    a, op, b, value = move
    if countdown.whole_result(a, b, op) != value or (len(child) == 1 and restated != target):
        return False
    pair, after = (min(a, b), max(a, b)), sorted(child)
    return any((small, big) == pair and c[0] == value and sorted(c) == after
               for big, _, small, c in countdown.legal_moves(parent))


def read_search(nums, target, completion):
    """[Line] for every move the search before the first <Solution> writes, in order."""
    head = completion.split("<Solution>", 1)[0]
    open_states = OpenStates(len(nums), tuple(nums))
    lines = []
    for m in _MOVE.finditer(head):
        g = m.groups()[:6] if m[1] is not None else m.groups()[6:]
        a, op, b, value = int(g[0]), g[1], int(g[2]), int(g[3])
        if g[4] is not None:
            child, restated = tuple(int(x) for x in g[4].split(",")), None
        else:
            child, restated = (value,), int(g[5])
        parent, _ = open_states.write(len(child))
        reaches = value == target if len(child) == 1 else countdown.solvable(child, target)
        lines.append(Line(parent, (a, op, b, value), child, restated,
                          _legal(parent, (a, op, b, value), child, restated, target), reaches))
        if len(child) > 1:
            open_states.enter(len(child), child)
    return lines


def _moves(state, ops):
    """The legal moves of `state` in the reference search's order: [(key, child)], key =
    (big, op, small, sorted child) (how a written line is matched to a move)."""
    return [((big, op, small, tuple(sorted(child))), child)
            for big, op, small, child in countdown.legal_moves(state, ops)]


def passed_over(nums, target, lines, gave_up=False, ops=countdown.OPS):
    """The legal moves the written search passed over, as (to a dead end, to a live state)
    counts. A state's move is passed over when the search wrote a later move of that state (in
    the reference order `ops`) but not this one, or when it left the state's subtree (wrote a
    move of an ancestor's) without it; gave_up (the answer ends with countdown.NO_SOLUTION)
    leaves every state. A move to a dead end cannot reach the target (a leaf: misses it)."""
    states = [[_moves(tuple(nums), ops), set(), False]]  # per written state: [its moves, the indices written, left?]
    open_states = OpenStates(len(nums), 0)  # items: indices in `states`
    for line in lines:
        size = len(line.child)
        parent, left = open_states.write(size)
        for k in left:
            states[k][2] = True
        if parent is not None:
            moves, written, _ = states[parent]
            a, op, b, _ = line.move
            key = (max(a, b), op, min(a, b), tuple(sorted(line.child)))
            k = next((k for k, (mk, _) in enumerate(moves) if mk == key and k not in written), None)
            if k is not None:
                written.add(k)
        if size > 1:
            open_states.enter(size, len(states))
            states.append([_moves(line.child, ops), set(), False])
    dead = live = 0
    for moves, written, left in states:
        last = max(written, default=-1)
        for k, (_, child) in enumerate(moves):
            if k in written or (k > last and not (left or gave_up)):
                continue
            reaches = child[0] == target if len(child) == 1 else countdown.solvable(child, target)
            live, dead = live + reaches, dead + (not reaches)
    return dead, live


SEARCH_COUNTS = {  # what search_counts returns per answer; the training logs hold their means
    "lines": "moves written (lines that lead to a set, leaves included)",
    "leaf_misses": "leaves written whose value misses the target",
    "dead_pairs": "2-number states written from which the target cannot be reached (the exact oracle)",
    "process_errors": "moves written that are not a legal move of the state they continue (wrong arithmetic included)",
    "skipped_dead": "legal moves passed over that lead to a dead end (a prune)",
    "skipped_live": "legal moves passed over from which the target can still be reached",
}


def written_order(completion):
    """The order of operations a compact answer announces in its first line (`+*-/`), else
    LongProc's (countdown.OPS): the order passed_over reads a search in."""
    first = completion.split("\n", 1)[0]
    return first if sorted(first) == sorted(countdown.OPS) else countdown.OPS


def search_counts(nums, target, completion):
    """SEARCH_COUNTS of one answer: {name: int}."""
    lines = read_search(nums, target, completion)
    head = completion.split("<Solution>", 1)[0]
    dead, live = passed_over(nums, target, lines, gave_up=countdown.NO_SOLUTION in head, ops=written_order(completion))
    return {"lines": len(lines), "leaf_misses": sum(len(x.child) == 1 and not x.reaches for x in lines),
            "dead_pairs": sum(len(x.child) == 2 and not x.reaches for x in lines),
            "process_errors": sum(not x.legal for x in lines), "skipped_dead": dead, "skipped_live": live}

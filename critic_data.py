"""The critic's rows: where (state, reached, target) come from, and how they become batches.

    pool = SearchPool(random.Random(0), "hindsight", "tiny", problems.never_train_on("tiny"))
    states, goals, known = make_batch(rng, pool, 256)       # a batch drawn per state size
    rows = written_rows(nums, target, states_written)       # hindsight rows of a search a policy wrote
    states, targets, labels = own_target_labels(rows)          # reachability labels, no oracle

Rows come from reference searches (countdown.search_states) of fresh random instances (the
hindsight sampler) or of the preset's solvable problems (the paper's trace sampler), or from the
searches a policy writes (written_rows, for the online critic); they are kept per state size
(RowPool). critic.py trains on them and calibrates its scores with own_target_labels.
Imports: answers (how a written search is read), countdown, torch.
"""
import random

import torch

import answers
import countdown
from problems import PRESETS, never_train_on, random_problem

POOL_ROWS = 20_000      # rows kept per state size; each step adds FRESH_SEARCHES new searches
FRESH_SEARCHES = 8


def random_instance(rng, preset, exclude):
    """Numbers and a target from the preset's ranges, solvable or not, never a key in `exclude`."""
    p = PRESETS[preset]
    while True:
        nums = tuple(rng.randint(*p["num_range"]) for _ in range(p["n"]))
        target = rng.randint(*p["target_range"])
        if countdown.problem_key(nums, target) not in exclude:
            return nums, target


class RowPool:
    """Rows (state, reached, target) kept per state size, at most `capacity` each: once a size is
    full, a new row replaces a random one. reached: values reached below the state."""

    def __init__(self, capacity=POOL_ROWS):
        self.capacity, self.rows = capacity, {}

    def add(self, rng, rows):
        for row in rows:
            kept = self.rows.setdefault(len(row[0]), [])
            if len(kept) < self.capacity:
                kept.append(row)
            else:
                kept[rng.randrange(self.capacity)] = row

    def sample(self, rng, counts):
        """{size: n} -> n rows of each state size, drawn without replacement."""
        return [row for k, n in counts.items() for row in rng.sample(self.rows[k], n)]


class SearchPool(RowPool):
    """A RowPool fed by reference searches (countdown.search_states).

    reached: the values the search reached below the state. The search stops only on the target,
    so where the target is not in `reached` it explored the state's whole subtree and `reached`
    is everything the state can reach. hindsight searches fresh random instances: an unsolvable
    one is searched to the end, which is where 3-number subtrees get finished (the preset's short
    searches never leave their first 3-number state, which is on the way to the target). trace
    searches the preset's solvable problems. Each `draw` first adds `fresh` searches: a search
    costs more than a step's use of its rows.
    """

    def __init__(self, rng, sampler, preset, exclude, capacity=POOL_ROWS, fresh=FRESH_SEARCHES):
        super().__init__(capacity)
        self.rng, self.sampler, self.preset, self.exclude, self.fresh = rng, sampler, preset, exclude, fresh

    def add_search(self):
        if self.sampler == "trace":
            nums, target = random_problem(self.rng, exclude=self.exclude, **PRESETS[self.preset])
        else:
            nums, target = random_instance(self.rng, self.preset, self.exclude)
        self.add(self.rng, [(state, reached, target) for state, reached in countdown.search_states(nums, target)])

    def draw(self, counts):
        """Add fresh searches (more while a size holds too few rows), then sample(counts)."""
        added = 0
        while added < self.fresh or any(len(self.rows.get(k, ())) < n for k, n in counts.items()):
            self.add_search()
            added += 1
        return self.sample(self.rng, counts)


def size_counts(batch_size, preset):
    """Rows per state size: weight 2 for states of 2+ numbers, 1 for one-number leaves."""
    sizes = range(PRESETS[preset]["n"] - 1, 0, -1)
    weights = [2 if k > 1 else 1 for k in sizes]
    counts = [batch_size * w // sum(weights) for w in weights]
    counts[0] += batch_size - sum(counts)
    return dict(zip(sizes, counts))


def make_batch(rng, pool, batch_size):
    """A batch of the pool's rows, drawn per state size (size_counts): see rows_batch."""
    return rows_batch(rng, pool.draw(size_counts(batch_size, pool.preset)), pool.sampler, pool.preset)


def rows_batch(rng, rows, sampler, preset):
    """states, goals [B], known [B, B] (goal j was reached below state i: no negative for it)."""
    lo, hi = PRESETS[preset]["target_range"]
    states, goals, known_sets = [], [], []
    for state, reached, target in rows:
        if sampler == "trace":
            goal, known = target, {target}
        else:
            in_range = [v for v in sorted(reached) if lo <= v <= hi]
            goal, known = rng.choice(in_range or sorted(reached)), reached
        states.append(state)
        goals.append(goal)
        known_sets.append(known)
    column = {g: c for c, g in enumerate(sorted(set(goals)))}  # known[i, j] = goal j in known_sets[i]
    hits = [(i, column[v]) for i, k in enumerate(known_sets) for v in k if v in column]
    bits = torch.zeros((len(rows), len(column)), dtype=torch.bool)
    bits[tuple(torch.tensor(hits).T)] = True
    return states, torch.tensor(goals), bits[:, [column[g] for g in goals]]


def own_target_labels(rows):
    """(states, targets, labels) from rows (state, reached, target), no oracle: each state with
    the target of its own search, reachable iff the search reached it below the state. Exact for
    the reference search (it stops only on the target, so a state whose subtree misses it was
    searched whole); for a policy's search, which may pass moves over, a 0 can be wrong. These
    are the pairs the credits value (a written state and its problem's target), so a fit on them
    has the base rate of those: about 13% / 38% / 100% reachable for 1 / 2 / 3-number states in
    `tiny`, against 1% / 3% / 15% when each state is paired with every target of the range
    (the hindsight labels calibrate was fitted on before)."""
    return [tuple(s) for s, _, _ in rows], [t for _, _, t in rows], [float(t in reached) for _, reached, t in rows]


def calibration_rows(preset, searches=400, per_size=400, seed=0):
    """Rows of `searches` reference searches of the preset's own problems (never a held-out one),
    the initial numbers included (reached: everything the search reached), at most `per_size`
    per state size, for `calibrate`: states like the ones a policy writes toward its target."""
    rng, exclude = random.Random(seed), never_train_on(preset)
    rows = {}
    for _ in range(searches):
        nums, target = random_problem(rng, exclude=exclude, **PRESETS[preset])
        states = countdown.search_states(nums, target)
        below = frozenset(v for _, reached in states for v in reached)
        for state, reached in [(tuple(nums), below), *states]:
            kept = rows.setdefault(len(state), [])
            if len(kept) < per_size:
                kept.append((state, reached, target))
    return [row for kept in rows.values() for row in kept]


def written_rows(nums, target, states):
    """Hindsight rows (state, reached, target) of one search a policy wrote, no oracle involved.

    states: the number sets it writes, in order (answers.extract_states). A state's parent is
    the latest open state with one more number (the problem's numbers above the first move); a
    written state closes every open state of its size or smaller (the search came back up). A
    state that is not one legal move from its parent (a slip in the arithmetic or the
    bookkeeping) is dropped, and so is everything written below it. reached: the one-number
    results written below the state (itself, for a leaf); a state with none makes no row."""
    open_states = answers.OpenStates(len(nums), (tuple(sorted(nums)), None))  # items: (state, reached; None: the root)
    rows = []
    for written in states:
        state = tuple(sorted(written))
        parent, _ = open_states.write(len(state))
        if parent is None or state not in countdown.next_states(parent[0]):
            continue
        reached = set()
        if len(state) == 1:
            for _, above in open_states.open_items():
                if above is not None:
                    above.add(state[0])
            reached.add(state[0])
        open_states.enter(len(state), (state, reached))
        rows.append((state, reached))
    return [(state, tuple(sorted(reached)), target) for state, reached in rows if reached]

"""Where problems come from: the presets' generated streams and their fixed held-out problems,
files of problems, the problems no training may see; and a run's source of training problems
(a preset's endless stream, or a file of your own with a held-out split) and what its
evaluations read.

    python train.py --mode sft --data mine.jsonl --heldout 200     # train on the rest, evaluate on 200
    python train.py --mode grpo --data mine.jsonl --heldout 200 --model runs/tiny-sft
    source = training_problems(args)          # train.py builds it once; sft.py and rl.py draw from it
    source.draw(rng)                          # one training problem, a function of rng's state
    heldout_problems(1000, "tiny")            # the preset's held-out problems (the same everywhere)
    random_problem(rng, **PRESETS["tiny"])    # one solvable problem of a preset, a function of rng's state

A file is LongProc's JSON or our JSONL (load_problems, as `eval.py --data` reads).
`--heldout N` keeps N of its problems out of training: the N whose keys hash lowest (a split
fixed by the problems alone, whatever their order or the seed), written to the run directory
as split.json; the held-out evaluations read them. Without --heldout the evaluations read the
preset's held-out stream, and the file must not hold any of its problems. Training never draws
a problem of LongProc's test split. Every problem must fit the preset (as many numbers, in its
ranges), since the tokenizer and the budget were sized for it. Draws are uniform over the
training problems, from the same (seed, step, rank) generators as the preset's stream.
Imports: countdown.
"""
import functools
import hashlib
import json
import os
import random

import countdown

# ---------------------------------------------------------------------------------------------
# The presets' problems

NUM_RANGE, TARGET_RANGE = (1, 49), (10, 50)  # LongProc's distribution for 4 numbers


def random_problem(rng, n=4, num_range=NUM_RANGE, target_range=TARGET_RANGE, tokens=None, exclude=frozenset()):
    """A solvable problem from the LongProc distribution, deterministic for `rng`'s state.

    rng: a random.Random. tokens: (lo, hi) bounds on the reference search's length
    (countdown.trace_tokens of countdown.search_trace), the difficulty knob (LongProc 0.5k:
    (330, 510), 2k: (1080, 2050), 8k: (4100, 8100)).
    exclude: a set of `problem_key`s never to return (held-out / test problems).
    """
    for _ in range(100_000):
        nums = tuple(rng.randint(*num_range) for _ in range(n))
        target = rng.randint(*target_range)
        if countdown.problem_key(nums, target) in exclude:
            continue
        if tokens is None:
            if countdown.solvable(nums, target):
                return countdown.Problem(nums, target)
        elif countdown.solved_within(nums, target, tokens[1]):  # False: unsolvable or over the bound, found sooner
            if tokens[0] <= countdown.trace_tokens(countdown.search_trace(nums, target)) <= tokens[1]:
                return countdown.Problem(nums, target)
    raise ValueError(f"no solvable problem with n={n}, numbers {num_range}, targets {target_range}, tokens {tokens}")


HELDOUT_SEED = 20_251_122  # the held-out stream; training streams use other seeds and exclude it
PRESETS = {  # problem distributions: keyword arguments of random_problem
    # the built-in tiny model's: 4 one-digit numbers, searches of at most ~20 tries (CPU-sized)
    "tiny": {"n": 4, "num_range": (1, 9), "target_range": TARGET_RANGE, "tokens": (0, 1100)},
    # out of distribution for the tiny model: the same numbers, targets above any it trains on
    # (the 1,500-step warm start solves none of them)
    "tiny-ood": {"n": 4, "num_range": (1, 9), "target_range": (51, 99), "tokens": (0, 1100)},
    # a milder shift: inputs up to 12, so about two problems in three hold an input it never saw as one
    # (the 1,500-step warm start solves 15% of them, 300 problems: room to move either way)
    "tiny-wide": {"n": 4, "num_range": (1, 12), "target_range": TARGET_RANGE, "tokens": (0, 1100)},
    # LongProc's 0.5k split: 4 numbers in 1..49, 330-510 search tokens
    "longproc": {"n": 4, "num_range": NUM_RANGE, "target_range": TARGET_RANGE, "tokens": (330, 510)},
}


def heldout_problems(n, preset="tiny"):
    """The first n problems of the fixed held-out stream of a preset (the same everywhere)."""
    return list(_heldout_stream(n, preset))


@functools.lru_cache(maxsize=None)  # a run asks twice (what it evaluates, what it never trains on)
def _heldout_stream(n, preset):
    rng = random.Random(HELDOUT_SEED)
    return tuple(random_problem(rng, **PRESETS[preset]) for _ in range(n))


# ---------------------------------------------------------------------------------------------
# Files of problems, and the problems training never sees

def load_problems(path):
    """Problems from LongProc's JSON (a list of records) or our JSONL (a record per line).

    Each record needs `nums` (>= 2 non-negative integers) and `target` (an integer); other
    fields are ignored. A malformed file raises one ValueError naming the file and the record.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ValueError(f"{path}: cannot read problems ({e.strerror})") from None
    try:
        if text.lstrip().startswith("["):
            records = list(enumerate(json.loads(text), 1))
        else:
            records = [(i, json.loads(line)) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON or JSONL (line {e.lineno}: {e.msg})") from None
    problems = []
    for i, rec in records:
        nums = rec.get("nums") if isinstance(rec, dict) else None
        target = rec.get("target") if isinstance(rec, dict) else None
        ints = isinstance(nums, list) and all(type(x) is int and x >= 0 for x in nums)
        if not ints or len(nums) < 2 or type(target) is not int:
            raise ValueError(f"{path}: record {i} is not a problem: expected "
                             f'{{"nums": [>= 2 integers], "target": integer}}, got {str(rec)[:120]}')
        problems.append(countdown.Problem(tuple(nums), target))
    if not problems:
        raise ValueError(f"{path}: holds no problems")
    return problems


LONGPROC_TEST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "longproc",
                             "countdown_0.5k.json")  # LongProc's public test split, beside the clone


@functools.lru_cache(maxsize=None)
def never_train_on(preset="tiny"):
    """Keys of the problems no training may see: the first 1,000 of the preset's held-out stream
    and, when it is beside the project, every problem of LongProc's test split."""
    return frozenset({countdown.problem_key(*p) for p in heldout_problems(1000, preset)} | longproc_test_keys())


def longproc_test_keys():
    """Keys of LongProc's test split when it is beside the project (never trained on), else none."""
    return {countdown.problem_key(*p) for p in load_problems(LONGPROC_TEST)} if os.path.exists(LONGPROC_TEST) else set()


# ---------------------------------------------------------------------------------------------
# A run's problems

SPLIT = "split.json"


class Problems:
    """A run's training problems (None: the preset's stream) and its held-out problems."""

    def __init__(self, preset, train, heldout, exclude):
        self.preset, self.train, self.heldout, self.exclude = preset, train, heldout, exclude

    def draw(self, rng):
        if self.train is None:
            return random_problem(rng, exclude=self.exclude, **PRESETS[self.preset])
        return self.train[rng.randrange(len(self.train))]


def split(problems, heldout):
    """(training, held-out) problems: the `heldout` whose keys hash lowest are held out."""
    order = sorted(problems, key=lambda p: hashlib.sha256(repr(countdown.problem_key(*p)).encode()).hexdigest())
    return order[heldout:], order[:heldout]


def _file_problems(args):
    """The file's problems, checked, or a one-line ValueError."""
    problems = load_problems(args.data)
    preset = PRESETS[args.preset]
    (lo, hi), (tlo, thi) = preset["num_range"], preset["target_range"]
    for k, p in enumerate(problems, 1):
        if len(p.nums) != preset["n"] or not all(lo <= x <= hi for x in p.nums) or not tlo <= p.target <= thi:
            raise ValueError(f"{args.data}: problem {k} ({list(p.nums)} -> {p.target}) does not fit --preset "
                             f"{args.preset}: {preset['n']} numbers in [{lo}, {hi}], a target in [{tlo}, {thi}]")
    if args.heldout is not None:
        seen = {}
        for k, p in enumerate(problems, 1):
            key = countdown.problem_key(*p)
            if key in seen:
                raise ValueError(f"{args.data}: problems {seen[key]} and {k} are the same ({list(p.nums)} -> {p.target}):"
                                 f" a held-out split needs distinct problems")
            seen[key] = k
        if not 0 < args.heldout < len(problems):
            raise ValueError(f"--heldout {args.heldout}: between 1 and {len(problems) - 1} "
                             f"(the file holds {len(problems)} problems)")
    return problems


def check(args):
    """One-line problems with --data and --heldout, before any model loads."""
    if args.data is None:
        return ["--heldout splits the problems of --data: give the file"] if args.heldout is not None else []
    try:
        problems = _file_problems(args)
    except ValueError as e:
        return [str(e)]
    train, _ = split(problems, args.heldout or 0)
    test = never_train_on(args.preset) if args.heldout is None else longproc_test_keys()
    clash = next((p for p in train if countdown.problem_key(*p) in test), None)
    if clash is not None:
        where = "a held-out problem of the preset" if args.heldout is None else "a problem of LongProc's test split"
        return [f"{args.data}: {list(clash.nums)} -> {clash.target} is {where}, which training never sees "
                f"(remove it{'' if args.heldout is not None else ', or hold out a split of the file with --heldout N'})"]
    if args.resume:
        saved = _saved_split(args.out)
        if saved is not None and saved != _split_record(args, problems):
            return [f"--resume: {args.data} no longer gives the run's split ({os.path.join(args.out, SPLIT)})"]
    return []


def _split_record(args, problems):
    train, heldout = split(problems, args.heldout or 0)
    return {"data": args.data, "train": len(train), "heldout": [[list(p.nums), p.target] for p in heldout]}


def _saved_split(out):
    path = os.path.join(out, SPLIT)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def training_problems(args, write_to=None):
    """The run's Problems; `write_to`: the run directory, where split.json records the split."""
    exclude = never_train_on(args.preset)
    if args.data is None:
        return Problems(args.preset, None, heldout_problems(args.eval_problems, args.preset), exclude)
    problems = _file_problems(args)
    train, heldout = split(problems, args.heldout or 0)
    if write_to is not None:
        with open(os.path.join(write_to, SPLIT), "w") as f:
            json.dump(_split_record(args, problems), f)
    evaluated = heldout[:args.eval_problems] if heldout else heldout_problems(args.eval_problems, args.preset)
    return Problems(args.preset, tuple(train), tuple(evaluated), exclude)

"""Where a run's problems come from: a preset's endless stream, or a file of your own with a
held-out split; and which problems its evaluations read.

    python train.py --mode sft --data mine.jsonl --heldout 200     # train on the rest, evaluate on 200
    python train.py --mode grpo --data mine.jsonl --heldout 200 --model runs/tiny-sft
    source = training_problems(args)          # train.py builds it once; sft.py and rl.py draw from it
    source.draw(rng)                          # one training problem, a function of rng's state

A file is LongProc's JSON or our JSONL (countdown.load_problems, as `eval.py --data` reads).
`--heldout N` keeps N of its problems out of training: the N whose keys hash lowest (a split
fixed by the problems alone, whatever their order or the seed), written to the run directory
as split.json; the held-out evaluations read them. Without --heldout the evaluations read the
preset's held-out stream, and the file must not hold any of its problems. Training never draws
a problem of LongProc's test split. Every problem must fit the preset (as many numbers, in its
ranges), since the tokenizer and the budget were sized for it. Draws are uniform over the
training problems, from the same (seed, step, rank) generators as the preset's stream.
Imports: countdown.
"""
import hashlib
import json
import os

import countdown

SPLIT = "split.json"


class Problems:
    """A run's training problems (None: the preset's stream) and its held-out problems."""

    def __init__(self, preset, train, heldout, exclude):
        self.preset, self.train, self.heldout, self.exclude = preset, train, heldout, exclude

    def draw(self, rng):
        if self.train is None:
            return countdown.random_problem(rng, exclude=self.exclude, **countdown.PRESETS[self.preset])
        return self.train[rng.randrange(len(self.train))]


def split(problems, heldout):
    """(training, held-out) problems: the `heldout` whose keys hash lowest are held out."""
    order = sorted(problems, key=lambda p: hashlib.sha256(repr(countdown.problem_key(*p)).encode()).hexdigest())
    return order[heldout:], order[:heldout]


def _file_problems(args):
    """The file's problems, checked, or a one-line ValueError."""
    problems = countdown.load_problems(args.data)
    preset = countdown.PRESETS[args.preset]
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
    test = countdown.never_train_on(args.preset) if args.heldout is None else countdown.longproc_test_keys()
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
    exclude = countdown.never_train_on(args.preset)
    if args.data is None:
        return Problems(args.preset, None, countdown.heldout_problems(args.eval_problems, args.preset), exclude)
    problems = _file_problems(args)
    train, heldout = split(problems, args.heldout or 0)
    if write_to is not None:
        with open(os.path.join(write_to, SPLIT), "w") as f:
            json.dump(_split_record(args, problems), f)
    evaluated = heldout[:args.eval_problems] if heldout else countdown.heldout_problems(args.eval_problems, args.preset)
    return Problems(args.preset, tuple(train), tuple(evaluated), exclude)

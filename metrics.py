"""What a run logs: the meaning of every key of metrics.jsonl (one source), and the reducer a step
adds its metrics to where it computes them.

    m = StepMetrics(device)
    with m.seconds("time_sample"):                 # this process's seconds (waits for the device)
        ...
    m.mean("success_rate", correct.sum(), "rollouts")   # a sum here; the mean over every process's rollouts
    m.count("rollouts", len(correct))
    row = m.reduce(world)                          # one collective for every mean
    python metrics.py                              # every key and its meaning (docs/metrics.md's table)

A mean divides the sum over processes of what each added by the sum of its count: rollouts,
response tokens, groups, or processes (a per-process value, averaged). docs/metrics.md's table is
`python metrics.py --write`; tests/test_docs.py fails when the page differs from docs().
Imports: answers, countdown, rewards (each term's metrics), distributed, torch.
"""
import argparse
import math
import os
import re
from contextlib import contextmanager

import answers
import countdown
import rewards
from distributed import all_reduce, clock

LOOP = {  # the loop's keys (train.py, sft.py, rl.py); the reward terms add theirs as "<term>/<name>"
    "step": "optimizer steps done", "lr": "learning rate of the step",
    "loss": "training loss (SFT: cross-entropy per token; RL: clipped surrogate + KL)",
    "reward_mean": "mean total reward of the rollouts",
    "success_rate": "fraction of the kept rollouts that verify (refilling keeps groups with signal: not the "
                    "policy's success; that is sampled_success_rate)",
    "format_rate": "fraction of rollouts with a parsable <Solution> block",
    "guess_rate": "fraction of rollouts with a <Solution> block after a search that never hit the target",
    "adv_std": "std of the advantages",
    "zero_adv_frac": "fraction of the kept groups whose every token's advantage is 0 (no signal of any kind)",
    "sampled_flat_frac": "fraction of all sampled groups (every round, every process) without signal: equal "
                         "outcomes and equal pay from each term (RewardTerm.signal); what refilling reads",
    "sampled_flat_outcome_frac": "fraction of all sampled groups whose outcomes are all equal",
    "sampled_success_rate": "fraction of all sampled rollouts (every round, kept or not) that verify",
    "sample_rounds": "rounds of rollouts the step drew (--max-sample-rounds; mean over processes)",
    "truncated_frac": "fraction of rollouts cut by the token budget (--mask-truncated takes them out of the loss)",
    "sampler_logp_gap": "mean |sampler log-prob - trainer's old log-prob| over response tokens (bf16 rollouts, "
                        "top-k/top-p; --tis-cap corrects for it)",
    "kl": "approx. KL(old || new) over the updates", "kl_ref": "k3 KL to the reference (with --kl-coef)",
    "clip_frac": "fraction of tokens whose ratio was clipped",
    "warmup_step": "a reward term's warm-up step, in a step-0 row: the term trains, the policy does not "
                   "(--clipo-warmup)",
    "entropy": "mean token entropy of the sampling distribution (at --temperature) over the rollouts",
    "response_length_mean": "mean rollout length (tokens)", "response_length_max": "longest rollout (tokens)",
    "tokens_per_s": "sampled tokens per second of sampling (all ranks, every round, kept or not)",
    "kept_tokens_per_s": "the tokens of the kept rollouts per second of sampling (all ranks)",
    "time_sample": "seconds sampling", "time_reward": "seconds scoring (decode, verify, the mode's reward terms)",
    "time_train": "seconds in forward/backward passes (the old-log-prob pass and the updates)",
    "time_update": "of those, seconds in the updates (RL); every time_* waits for the device first",
    "heldout/success_rate": "greedy success on held-out problems (every --eval-every steps)",
    "heldout/success_low": "its 95% Wilson interval, lower end", "heldout/success_high": "and upper end",
    **{f"search/{key}": f"per rollout: {meaning}" for key, meaning in answers.SEARCH_COUNTS.items()},
    "search/solved_with_errors": "fraction of rollouts that verify with a process error in their search",
    **{f"heldout/{key}": f"per held-out answer: {meaning}" for key, meaning in answers.SEARCH_COUNTS.items()},
    "heldout/solved_with_errors": "fraction of held-out answers that verify with a process error in their search",
    **{f"heldout/failed_{kind.replace(' ', '_')}": f"fraction of held-out answers that failed: {kind} (answers.failure)"
       for kind in answers.FAILURES[1:]},
}
SHIFT = "mean over response tokens of |the term's part of the token's advantage| (its centred bonus plus the " \
        "rewards-to-go of its step rewards; rl.term_shifts)"
SHIFT_KINDS = {f"adv_shift_{kind}": f"the same over the tokens of {kind} groups ({what})" for kind, what in
               (("mixed", "some rollouts verify"), ("solved", "every rollout verifies"), ("failed", "none verifies"))}


def docs():
    """Every key a line of metrics.jsonl may hold, with its meaning: the loop's, then each
    registered reward term's as "<term>/<metric>" (with "<term>/adv_shift*" when it moves advantages)."""
    out = dict(LOOP)
    for name, term in rewards.REWARD_TERMS.items():
        out.update({f"{name}/{key}": meaning for key, meaning in {"adv_shift": SHIFT, **SHIFT_KINDS,
                                                                   **term.metrics}.items()})
    return out


class StepMetrics:
    """One step's metrics on this process, added where they are computed; `reduce` turns them
    into the step's row, the same on every process."""

    def __init__(self, device):
        self.device = device
        self.sums = {"processes": 1.0}  # each mean's sum, and the counts they are divided by
        self.per = {}                   # mean -> the count it is divided by
        self.spreads = []               # means whose standard deviation is logged (sums of x and x^2)
        self.largest = {}               # maxima over processes
        self.times = {}                 # this process's seconds

    def count(self, per, n):
        self.sums[per] = float(n)

    def mean(self, name, total, per):
        """Log `name` = the sum of `total` over processes / the sum of the count `per` (at least 1)."""
        self.sums[name], self.per[name] = float(total), per

    def term(self, name, value):
        """A reward term's metric: a number is averaged over processes; a (sum, count) pair is
        the sum over processes divided by the count's (a ratio of global sums: processes whose
        counts differ weigh by them)."""
        if isinstance(value, tuple):
            self.count(f"{name} count", value[1])
            self.mean(name, value[0], f"{name} count")
        else:
            self.mean(name, value, "processes")

    def std(self, name, values, per):
        """Log `name` = the standard deviation of `values` (a tensor) over every process's `per`."""
        self.mean(f"{name} sum", values.sum().item(), per)
        self.mean(f"{name} squares", (values ** 2).sum().item(), per)
        self.spreads.append(name)

    def most(self, name, value):
        self.largest[name] = value

    @contextmanager
    def seconds(self, *names):
        """Add the block's seconds on this process to each of `names`."""
        start = clock(self.device)
        yield
        elapsed = clock(self.device) - start
        for name in names:
            self.times[name] = self.times.get(name, 0.0) + elapsed

    def reduce(self, world):
        """The step's row, and the sums over processes (one collective for the means, one for the maxima)."""
        totals = all_reduce(self.sums, world)
        row = {name: totals[name] / max(totals[per], 1.0) for name, per in self.per.items()}
        for name in self.spreads:
            mean, square = row.pop(f"{name} sum"), row.pop(f"{name} squares")
            row[name] = math.sqrt(max(0.0, square - mean ** 2))
        if self.largest:
            row.update(zip(self.largest, all_reduce(list(self.largest.values()), world, "max")))
        return {**row, **self.times}, totals


# ---------------------------------------------------------------------------------------------
# What the policy wrote: the step's search counts, and a group a person can read (rollouts.jsonl)

def readable_group(run, r, step):
    """The step's first group, for a person to read (rollouts.jsonl): the prompt once, then each
    response with its reward, the mode's terms' bonuses, whether it verified, its length and
    what became of it (answers.failure)."""
    group, p = run.args.group_size, r.problems[0]
    return {"step": step, "kind": "rollouts", "nums": list(p.nums), "target": p.target,
            "prompt": countdown.prompt(p, run.style),
            "responses": [{"text": r.texts[i], "reward": round(r.reward[i].item(), 4),
                           "terms": {name: round(bonus[i].item(), 4) for name, bonus in r.bonuses.items()},
                           "verified": bool(r.correct[i]), "length": len(r.tokens[i]),
                           "failure": answers.failure(p.nums, p.target, r.texts[i], r.finished[i])}
                          for i in range(group)]}


def search_sums(r):
    """What the rollouts' searches wrote, summed over this process's rollouts: each of
    answers.SEARCH_COUNTS as "search/<name>", and "search/solved_with_errors" (rollouts that
    verify with a process error in their search)."""
    counts = [answers.search_counts(p.nums, p.target, text) for p, text in zip(r.problems, r.texts)]
    sums = {f"search/{key}": float(sum(c[key] for c in counts)) for key in answers.SEARCH_COUNTS}
    sums["search/solved_with_errors"] = float(sum(bool(ok) and c["process_errors"] > 0
                                                  for ok, c in zip(r.correct.tolist(), counts)))
    return sums


# ---------------------------------------------------------------------------------------------
# docs/metrics.md's table

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "docs", "metrics.md")
TABLE = re.compile(r"(<!-- metrics -->\n).*?(<!-- /metrics -->)", re.DOTALL)


def table():
    """docs() as a Markdown table."""
    rows = [f"| `{key}` | {meaning.replace('|', chr(92) + '|')} |" for key, meaning in docs().items()]
    return "\n".join(["| key | meaning |", "|---|---|", *rows]) + "\n"


def render(page_text):
    """The page with its table block written from docs()."""
    return TABLE.sub(lambda m: m[1] + table() + m[2], page_text)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help="write the table into docs/metrics.md (default: print it)")
    args = ap.parse_args(argv)
    if not args.write:
        print(table(), end="")
        return
    with open(PAGE, encoding="utf-8") as f:
        text = f.read()
    with open(PAGE, "w", encoding="utf-8") as f:
        f.write(render(text))


if __name__ == "__main__":
    import terms  # noqa: F401  (registers the built-in reward terms, whose metrics the table lists)
    main()

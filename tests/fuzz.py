"""Fuzz corpora for the outcome verifiers, shared by tests/test_countdown.py and bench/countdown.py.

Each corpus is a list of (nums, target, text): valid answers, near-misses made by mutating
them, and adversarial garbage (huge inputs, huge integers, unbalanced tags, unicode digits).
"""
import random
import re

import countdown
from problems import random_problem

_GARBAGE_ALPHABET = "0123456789 +-*/=()\n\t<>/SolutinaswerEv[],.٣３²⁴\u2003\u200b\x00é😀"
_TAGS = ["<Solution>", "</Solution>", "<answer>", "</answer>", "<Solution", "Solution>"]


def _spaced(rng, parts):
    return "".join(p + " " * rng.choice([0, 0, 1, 1, 2]) for p in parts)


def _solution_lines(rng, problem):
    """The equations of the reference solution, operands sometimes swapped, random spacing."""
    trace = countdown.search_trace(*problem)
    block = countdown.solution_block(trace).strip().split("\n")
    lines = []
    for eq in block:
        a, op, b, _, c = eq.split()
        if op in "+*" and rng.random() < 0.5:
            a, b = b, a
        lines.append(_spaced(rng, [a, op, b, "=", c]).strip())
    return lines


def _mutate_lines(rng, lines, nums):
    lines = list(lines)
    kind = rng.randrange(8)
    i = rng.randrange(len(lines))
    if kind == 0:  # change one number by a small amount
        parts = re.findall(r"\d+|[-+*/=]", lines[i])
        k = rng.choice([0, 2, 4])
        parts[k] = str(max(0, int(parts[k]) + rng.choice([-2, -1, 1, 2])))
        lines[i] = " ".join(parts)
    elif kind == 1:  # change the operation
        for op in "+-*/":
            if op in lines[i]:
                lines[i] = lines[i].replace(op, rng.choice("+-*/"), 1)
                break
    elif kind == 2:
        rng.shuffle(lines)
    elif kind == 3:
        del lines[i]
    elif kind == 4:
        lines.insert(i, lines[i])
    elif kind == 5:  # use a given number twice
        lines[i] = f"{nums[0]} + {nums[0]} = {2 * nums[0]}"
    elif kind == 6:
        lines.insert(i, "")
    else:  # swap the operands (wrong for - and / unless equal)
        parts = re.findall(r"\d+|[-+*/=]", lines[i])
        parts[0], parts[2] = parts[2], parts[0]
        lines[i] = " ".join(parts)
    return lines


def _wrap(rng, lines):
    body = "\n".join(lines)
    before = rng.choice(["", "Some search first.\n", "<Solution>\n</Solution>\n", "x" * rng.randrange(100)])
    after = rng.choice(["", "\n", "\n<Solution>\n1 + 1 = 2\n</Solution>", "</Solution>"])
    return before + "<Solution>\n" + body + "\n</Solution>" + after


def _garbage(rng):
    kind = rng.randrange(8)
    if kind == 0:
        return "".join(rng.choice(_GARBAGE_ALPHABET) for _ in range(rng.randrange(1, 300)))
    if kind == 1:  # tags in random order and nesting
        return "".join(rng.choice(_TAGS + ["\n", "1+2=3", " 99**98**5 "]) for _ in range(rng.randrange(1, 40)))
    if kind == 2:
        return "<Solution>\n" + "9" * rng.randrange(10, 5000) + " + 1 = 10\n</Solution>"
    if kind == 3:
        return "<answer>" + "(" * rng.randrange(1, 3000) + "1" + ")" * rng.randrange(3000) + "</answer>"
    if kind == 4:
        return "<Solution>\n99**98**5\n</Solution><answer>99**98**5</answer>"
    if kind == 5:
        return "<Solution>\n٣ + ３ = 6\n²+⁴=6\n</Solution><answer>٣+３</answer>"
    if kind == 6:
        return "<Solution>" + "\n" * rng.randrange(1, 100_000) + "</Solution>"
    return "<answer>" + "+".join(str(rng.randrange(10 ** rng.randrange(1, 30))) for _ in range(rng.randrange(1, 60))) + "</answer>"


def solution_corpus(seed=0, size=10_000):
    """(nums, target, completion) for `verify`: ~1/4 valid, ~1/2 mutated, ~1/4 garbage, plus
    a few 1 MB inputs."""
    rng = random.Random(seed)
    corpus = []
    for _ in range(size):
        problem = random_problem(rng, n=rng.choice([2, 3, 4, 4]))
        roll = rng.random()
        if roll < 0.25:
            text = _wrap(rng, _solution_lines(rng, problem))
        elif roll < 0.75:
            text = _wrap(rng, _mutate_lines(rng, _solution_lines(rng, problem), problem.nums))
        else:
            text = _garbage(rng)
        corpus.append((problem.nums, problem.target, text))
    megabyte = "".join(rng.choice(_GARBAGE_ALPHABET) for _ in range(1 << 20))
    for text in (megabyte, "<Solution>" + megabyte, "<Solution>\n" + "1 + 1 = 2\n" * 100_000 + "</Solution>",
                 "<Solution>" * 100_000 + "</Solution>" * 100_000):
        corpus.append(((1, 1, 2, 2), 4, text))
    return corpus

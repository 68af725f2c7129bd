"""Speed of the task functions: the oracle, the search, and the verifiers on the fuzz corpora.

    python bench/countdown.py

`solvable` is memoised on the sorted numbers; "cold" clears that cache first, "warm" calls it
again on the same problems (the case in RL, where a critic run asks about the same states).
"""
import gc
import pathlib
import random
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import countdown  # noqa: E402
from problems import random_problem  # noqa: E402
from tests.fuzz import solution_corpus  # noqa: E402


def timed(fn, items):
    """Seconds per call for each item, with the cyclic garbage collector paused as timeit does:
    its full passes over the oracle's memo (100k+ objects) took ~200 ms and landed on whatever
    call was running."""
    out = []
    gc.disable()
    for item in items:
        t = time.perf_counter()
        fn(*item)
        out.append(time.perf_counter() - t)
    gc.enable()
    return out


def row(name, seconds, unit="calls/s"):
    seconds = sorted(seconds)
    total = sum(seconds)
    print(f"| {name:<38} | {len(seconds) / total:>12,.0f} {unit} | {1e3 * total / len(seconds):8.3f} | "
          f"{1e3 * seconds[len(seconds) * 99 // 100]:8.3f} | {1e3 * seconds[-1]:8.3f} |")


def main():
    rng = random.Random(0)
    problems = [([rng.randint(1, 49) for _ in range(4)], rng.randint(10, 50)) for _ in range(2000)]
    print("| what | throughput | mean ms | p99 ms | max ms |\n|---|---|---|---|---|")
    countdown.reachable_values.cache_clear()
    row("solvable, 4 numbers, cold cache", timed(countdown.solvable, problems))
    row("solvable, 4 numbers, warm cache", timed(countdown.solvable, problems))
    row("search_trace, 4 numbers", timed(countdown.search_trace, problems[:500]))
    row("random_problem, LongProc 0.5k", timed(lambda r: random_problem(r, tokens=(330, 510)), [(rng,)] * 200))
    corpus = solution_corpus(seed=0, size=10_000)
    row(f"verify, fuzz corpus ({len(corpus):,})", timed(countdown.verify, corpus))


if __name__ == "__main__":
    main()

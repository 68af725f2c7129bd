"""How many torch threads each phase should use on this machine: decode steps vs training steps.

    python bench/threads.py

Times the built-in tiny model's KV-cached decode step (several batch sizes) and a training
step (forward + backward), with 1 and with all cores, side by side in one run. train.py picks
threads per phase from this (see cpu_threads there).
"""
import os
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import sample  # noqa: E402
from model import new_tiny_model  # noqa: E402


def decode_ms(lm, batch, steps=64, prompt=24):
    prompts = [[1] + list(range(4, 4 + prompt))] * batch
    sample.generate(lm, prompts, 8)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        sample.generate(lm, prompts, steps)
        best = min(best, time.perf_counter() - t)
    return 1e3 * best / steps


def train_ms(lm, batch, length):
    ids = torch.randint(4, 100, (batch, length))
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        lm(input_ids=ids, labels=ids).loss.backward()
        best = min(best, time.perf_counter() - t)
    return 1e3 * best


def main():
    lm = new_tiny_model(seed=0)
    many = os.cpu_count() or 1
    rows = [(f"decode step, batch {b}", lambda b=b: decode_ms(lm.eval(), b)) for b in (1, 8, 64, 128)]
    rows += [(f"train step, {b} x {n} tokens", lambda b=b, n=n: train_ms(lm.train(), b, n)) for b, n in ((16, 256), (64, 300))]
    print(f"| phase | 1 thread ms | {many} threads ms | {many} threads vs 1 |\n|---|---|---|---|")
    for name, fn in rows:
        torch.set_num_threads(1)
        one = fn()
        torch.set_num_threads(many)
        all_ = fn()
        print(f"| {name} | {one:.2f} | {all_:.2f} | {one / all_:.2f}x faster |")


if __name__ == "__main__":
    main()

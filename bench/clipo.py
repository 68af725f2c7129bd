"""The fused contrastive loss against two other formulations, side by side in one run (CPU, 1 thread).

    python bench/clipo.py

D=512, G=16, supcon and softnn (deterministic, so values can be compared to 1e-5):
  per-group loop: a Python loop over groups, vectorised inside each group (N=2048);
  N x N: the public code's formulation, one masked N x N similarity matrix over the whole batch
         (N=8192; the gap grows with N since its work is O(N^2) and ours O(N G)).
Each timing is the best of 3 runs (forward + backward).
"""
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from clipo import contrastive_loss  # noqa: E402

D, G, TAU = 512, 16, 0.05


def per_group_loop(z, correct, kind):
    out = []
    for start in range(0, len(z), G):
        zg, c = z[start:start + G], correct[start:start + G].bool()
        logits = zg @ zg.T / TAU
        eye = torch.eye(G, dtype=torch.bool)
        pos = c[:, None] & c[None, :] & ~eye
        valid = pos.any(-1) & (c[:, None] & ~c[None, :]).any(-1)
        denominator = logits.masked_fill(eye, float("-inf")).logsumexp(-1)
        usable = pos | (~pos.any(-1, keepdim=True) & eye)
        attract = (logits * usable).sum(-1) / usable.sum(-1) if kind == "supcon" else \
            logits.masked_fill(~usable, float("-inf")).logsumexp(-1)
        out.append(torch.where(valid, denominator - attract, torch.zeros_like(attract)))
    return torch.cat(out)


def full_matrix(z, correct, kind):
    n = len(z)
    logits = z @ z.T / TAU
    group = torch.arange(n) // G
    same = group[:, None] == group[None, :]
    eye = torch.eye(n, dtype=torch.bool)
    c = correct.bool()
    pos = same & c[:, None] & c[None, :] & ~eye
    valid = pos.any(-1) & (same & c[:, None] & ~c[None, :]).any(-1)
    denominator = logits.masked_fill(~same | eye, float("-inf")).logsumexp(-1)
    usable = pos | (~pos.any(-1, keepdim=True) & eye)
    attract = (logits * usable).sum(-1) / usable.sum(-1) if kind == "supcon" else \
        logits.masked_fill(~usable, float("-inf")).logsumexp(-1)
    return torch.where(valid, denominator - attract, torch.zeros_like(attract))


def timed(fn, z0):
    best, value = float("inf"), None
    for _ in range(3):
        z = z0.clone().requires_grad_()
        t = time.perf_counter()
        value = fn(z)
        value.sum().backward()
        best = min(best, time.perf_counter() - t)
    return best, value.detach()


def main():
    torch.set_num_threads(1)  # OpenMP wake-ups make 2-thread timings of small ops erratic here
    g = torch.Generator().manual_seed(0)
    print("| N | kind | fused ms | other | other ms | speed-up | max abs diff |\n|---|---|---|---|---|---|---|")
    for n, name, other in ((2048, "per-group loop", per_group_loop), (8192, "N x N matrix", full_matrix)):
        z0 = torch.nn.functional.normalize(torch.randn(n, D, generator=g), dim=-1)
        correct = (torch.rand(n, generator=g) < 0.4).float()
        for kind in ("supcon", "softnn"):
            fused_s, fused = timed(lambda z: contrastive_loss(z, correct, G, temperature=TAU, kind=kind)[0], z0)
            other_s, ref = timed(lambda z: other(z, correct, kind), z0)
            diff = (fused - ref).abs().max().item()
            assert diff <= 1e-5, diff
            print(f"| {n} | {kind} | {1e3 * fused_s:.1f} | {name} | {1e3 * other_s:.1f} | {other_s / fused_s:.0f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()

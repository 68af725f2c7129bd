"""The contrastive goal-conditioned critic: from this state, can the target still be reached?

    python critic.py --minutes 10 --out runs/critic.safetensors                   # hindsight sampler
    python critic.py --minutes 10 --preset longproc --out runs/critic_longproc.safetensors
    python critic.py --minutes 10 --sampler trace --out runs/critic_trace.safetensors  # the paper's
    python critic.py --eval runs/critic.safetensors --plot runs/critic_similarity.png
    python bench/critic.py --minutes 10 --seeds 0 1 2                            # a table over seeds

The model is the "numerical critic V2" of Shah, Wang & Yan. A state is the set of numbers still
available; the goal is the target. Each number is read through digit embeddings (one table per
digit place, least significant first), pooled per number; the numbers of a state meet in a small
transformer without positions (so the set's order cannot matter), are mean-pooled, and an MLP
gives a unit vector phi(state); the goal tower psi(target) reads digits the same way. The score
is phi . psi / tau (tau learned). Their V1 also saw the initial numbers: since the target is
always reachable from a problem's initial numbers, it collapsed to a parity feature. V2 sees
only the state, so it must learn what the state can still reach.

Training is InfoNCE (state, goal) with in-batch negatives, batch 256, AdamW with a cosine
decay over the run. Its rows are states the reference search (countdown.search_states) writes,
drawn per state size (3 / 2 / 1 numbers, 2:2:1), not per line of a search, whose lines are
mostly leaves; no held-out or LongProc test problem is ever searched. Two samplers:
  hindsight: searches of fresh random instances (the preset's numbers and targets, solvable or
             not); a state is paired with a value the search reached below it (in the target
             range when it reached one there), and a value the search reached below a state is
             never a negative for it: where the search finished the state's subtree, every
             in-batch negative is then truly unreachable.
  trace:     the paper's: a state of a solvable problem's search with that search's target
             (dead ends are taught to lead to the target).
The oracle (countdown.solvable) never labels training rows: it only evaluates. Evaluation: AUROC
against the oracle per state size on held-out problems: every state one, two and three moves
from a problem's numbers (all legal moves, not only the ones the search takes) with its target,
balanced reachable / unreachable per size. The headline is the 3-number AUROC (the first move).
Imports: countdown, critic_data (its rows), distributed (CPU threads), torch (matplotlib optionally, for
--plot).
"""
import argparse
import json
import math
import os
import random
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import countdown
from critic_data import SearchPool, calibration_rows, make_batch, own_target_labels
from distributed import cpu_threads
from problems import PRESETS, heldout_problems, never_train_on

PLACES = 4              # digits per number; larger numbers are read as 9999 (never reachable anyway)
EMPTY = 10              # the "no digit" symbol of a place beyond a number's length
EVAL_PROBLEMS = 300     # held-out problems whose successor states make the evaluation pairs
MAX_STATE = 8           # the largest state size a critic is calibrated for


def digits(values):
    """[..., PLACES] digit ids, least significant first, EMPTY past the number's length."""
    v = values.clamp(0, 10 ** PLACES - 1)
    out = [v % 10] + [torch.where(v >= 10 ** p, (v // 10 ** p) % 10, EMPTY) for p in range(1, PLACES)]
    return torch.stack(out, -1)


class NumberReader(nn.Module):
    """Digit embeddings (a table per place) -> one vector per number."""

    def __init__(self, width):
        super().__init__()
        self.table = nn.Embedding(PLACES * (EMPTY + 1), width)
        self.mix = nn.Sequential(nn.Linear(PLACES * width, width), nn.GELU(), nn.Linear(width, width))

    def forward(self, values):
        ids = digits(values) + torch.arange(PLACES, device=values.device) * (EMPTY + 1)
        return self.mix(self.table(ids).flatten(-2))


class Critic(nn.Module):
    def __init__(self, width=128, dim=128, layers=2, heads=4):
        super().__init__()
        self.config = {"width": width, "dim": dim, "layers": layers, "heads": heads}
        self.state_numbers, self.goal_numbers = NumberReader(width), NumberReader(width)
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.set_encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.state_head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(), nn.Linear(width, dim))
        self.goal_head = nn.Sequential(nn.GELU(), nn.Linear(width, dim))
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))  # 1/tau, learned
        # per state size (a, b) of p(reachable) = sigmoid(a * score + b) (`calibrate`); zeros: 0.5
        self.register_buffer("calibration", torch.zeros(MAX_STATE + 1, 2))

    def phi(self, states, present):
        """states [B, K] (padded), present [B, K] bool -> unit vectors [B, dim]."""
        h = self.set_encoder(self.state_numbers(states), src_key_padding_mask=~present)
        w = present.unsqueeze(-1).to(h.dtype)
        return F.normalize(self.state_head((h * w).sum(1) / w.sum(1).clamp(min=1)), dim=-1)

    def psi(self, goals):
        return F.normalize(self.goal_head(self.goal_numbers(goals)), dim=-1)

    def logits(self, states, present, goals):
        """[B, B] scores of every state against every goal of the batch."""
        return self.phi(states, present) @ self.psi(goals).T * self.log_scale.exp()

    @torch.no_grad()
    def reachability(self, states, targets):
        """Probability that each target can still be reached from its state: the score through the
        logistic fit of its state size (`calibrate`); a size never calibrated says 0.5 (nothing known)."""
        fits = self.calibration[torch.tensor([min(len(s), MAX_STATE) for s in states], dtype=torch.long)]
        return torch.sigmoid(fits[:, 0] * self.score(states, targets) + fits[:, 1]).cpu()

    @torch.no_grad()
    def score(self, states, targets):
        """Score of each (state, target): higher = more likely reachable. Batched, no grad."""
        if not states:
            return torch.zeros(0)
        device = self.log_scale.device
        values, present = pad_states(states, device)
        goals = torch.tensor(targets, device=device)
        return (self.phi(values, present) * self.psi(goals)).sum(-1) * self.log_scale.exp()


def pad_states(states, device="cpu"):
    width = max(1, max(len(s) for s in states))
    values = torch.zeros((len(states), width), dtype=torch.long)
    present = torch.zeros((len(states), width), dtype=torch.bool)
    for i, s in enumerate(states):
        values[i, :len(s)] = torch.tensor(list(s), dtype=torch.long)
        present[i, :len(s)] = True
    return values.to(device), present.to(device)


def save(critic, path):
    """Write atomically: two runs that both trained a missing critic never leave half a file."""
    tmp = f"{path}.tmp"
    save_file(critic.state_dict(), tmp, metadata={"config": json.dumps(critic.config)})
    os.replace(tmp, path)


def check_file(path):
    """`path` if it holds a critic written by `save`, else a one-line ValueError (before any
    model loads: a wrong --critic should not cost the user a policy load first)."""
    from safetensors import SafetensorError, safe_open
    if not os.path.isfile(path):
        raise ValueError(f"critic {path}: no such file (train one: python critic.py --out {path})")
    try:
        with safe_open(path, "pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"critic {path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
    if "config" not in metadata:
        raise ValueError(f"critic {path}: a safetensors file, but not a critic (no config; write it with critic.save)")
    return path


def load(path, preset="tiny"):
    """A trained Critic from a safetensors file written by `save` (one written before critics
    carried their calibration is calibrated on `preset`'s searches here)."""
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        config = json.loads(f.metadata()["config"])
    critic = Critic(**config)
    missing, _ = critic.load_state_dict(load_file(path), strict=False)
    if missing == ["calibration"]:  # written before critics were calibrated: fit it now
        calibrate(critic, calibration_rows(preset), preset)
    elif missing:
        critic.load_state_dict(load_file(path))  # the one-line error of a wrong file
    return critic.eval()


def fit_batch(model, optimizer, states, goals, known):
    """One InfoNCE step of `model` on a batch; returns the loss, detached (no host sync here)."""
    loss = infonce(model.logits(*pad_states(states), goals), known)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def infonce(logits, known):
    """Symmetric InfoNCE over a batch whose positives sit on the diagonal of logits [B, B]
    (state i against goal j). known[i, j]: goal j is known reachable from state i, so it is no
    negative there (masked; the same goal value in another row is one such case)."""
    eye = torch.eye(len(logits), dtype=torch.bool, device=logits.device)
    masked = logits.masked_fill(known & ~eye, float("-inf"))
    labels = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(masked, labels) + F.cross_entropy(masked.T, labels))


# ---------------------------------------------------------------------------------------------
# Evaluation against the exact oracle

def oracle_pairs(n_problems=EVAL_PROBLEMS, preset="tiny", seed=0, per_class=1000):
    """Held-out evaluation pairs by state size: {size: [(state, target, reachable)]}.

    For each of the first n_problems held-out problems, every distinct state one, two, ...
    moves from its numbers, with its target, labelled by the exact oracle; per size, up to
    per_class reachable and as many unreachable pairs, drawn at random (seeded)."""
    rng = random.Random(seed)
    pools = {}
    for problem in heldout_problems(n_problems, preset):
        level = [tuple(sorted(problem.nums))]
        while len(level[0]) > 1:
            level = sorted({s for parent in level for s in countdown.next_states(parent)})
            pos, neg = pools.setdefault(len(level[0]), ([], []))
            for state in level:
                (pos if countdown.solvable(state, problem.target) else neg).append((state, problem.target))
    out = {}
    for size, (pos, neg) in sorted(pools.items(), reverse=True):
        k = min(len(pos), len(neg), per_class)
        out[size] = [(s, t, True) for s, t in rng.sample(pos, k)] + [(s, t, False) for s, t in rng.sample(neg, k)]
    return out


def auroc(scores, labels):
    """Probability that a random positive outscores a random negative (ties count half)."""
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    n_pos = sum(labels)
    n_neg = len(labels) - n_pos
    return (sum(r for r, y in zip(ranks, labels) if y) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def evaluate(critic, pairs=None, preset="tiny"):
    """{state size: AUROC against the exact oracle} on `pairs` (default: oracle_pairs(preset))."""
    pairs = pairs or oracle_pairs(preset=preset)
    out = {}
    for size, rows in pairs.items():
        scores = critic.score([s for s, _, _ in rows], [t for _, t, _ in rows]).tolist()
        out[size] = auroc(scores, [y for _, _, y in rows])
    return out


def format_aurocs(aurocs):
    return " ".join(f"{size}num {value:.3f}" for size, value in sorted(aurocs.items(), reverse=True))


# ---------------------------------------------------------------------------------------------
# Training

def train(minutes=10.0, steps=None, sampler="hindsight", preset="tiny", batch_size=256, lr=2e-3, seed=0,
          progress=True, eval_every=250):
    """Train a fresh critic for `steps` steps, or for `minutes` of wall time. The learning rate
    warms up over 50 steps and decays on a cosine over the steps, or over the minutes."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    critic = Critic()
    optimizer = torch.optim.AdamW(critic.parameters(), lr=lr, weight_decay=0.01)
    pool = SearchPool(rng, sampler, preset, never_train_on(preset))
    log_pairs = oracle_pairs(EVAL_PROBLEMS // 2, preset, per_class=300)  # a cheap look, for the log
    start, step, history = time.time(), 0, []
    bar = tqdm(total=steps, desc=f"critic ({sampler}, {preset})", disable=not progress)
    while True:
        done = step / steps if steps else (time.time() - start) / (60 * minutes)
        if done >= 1:
            break
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * done))
        loss = fit_batch(critic, optimizer, *make_batch(rng, pool, batch_size))
        step += 1
        bar.update(1)
        if step % eval_every == 0:
            critic.eval()
            aurocs = evaluate(critic, log_pairs)
            critic.train()
            history.append({"step": step, "seconds": round(time.time() - start, 1), **aurocs})
            bar.set_postfix_str(f"loss {loss.item():.3f} AUROC {format_aurocs(aurocs)}")
            if progress:
                bar.write(f"step {step} ({time.time() - start:.0f} s): loss {loss.item():.3f}, "
                          f"held-out AUROC by state size {format_aurocs(aurocs)}")
    bar.close()
    critic.eval()
    calibrate(critic, calibration_rows(preset, seed=seed + 1), preset)
    critic.trained = {"steps": step, "seconds": time.time() - start, "sampler": sampler, "preset": preset,
                      "log": history}
    return critic


# ---------------------------------------------------------------------------------------------
# From scores to "can the target still be reached?"

@torch.no_grad()
def calibrate(model, rows, preset, steps=300):
    """Fit, per state size, p(reachable) = sigmoid(a * score + b) on own_target_labels(rows) (a
    logistic regression, full-batch Newton steps) and keep it on the model (`reachability`).
    Why: InfoNCE scores rank goals for a state, they are no probability; the credits read values
    as "can the target still be reached", as the oracle's 0/1, of states written toward their
    own target. A size whose labels are all one class gets that class's smoothed rate (the
    initial numbers of the preset's problems: every one reachable). `preset` is kept for callers."""
    states, targets, labels = own_target_labels(rows)
    scores = model.score(states, targets).cpu().double() if states else torch.zeros(0)
    fits = {}
    for size in sorted({len(s) for s in states}):
        pick = torch.tensor([len(s) == size for s in states])
        x, y = scores[pick], torch.tensor(labels, dtype=torch.double)[pick]
        w = torch.zeros(2, dtype=torch.double)
        if y.min() == y.max():
            w[1] = math.log((y.sum() + 0.5) / (len(y) - y.sum() + 0.5))  # log-odds of the smoothed rate
        else:
            X = torch.stack([x, torch.ones_like(x)], 1)
            for _ in range(steps):  # Newton-Raphson with a small ridge: separable data stay finite
                p = torch.sigmoid(X @ w)
                grad = X.T @ (p - y) + 1e-3 * w
                hess = X.T @ (X * (p * (1 - p))[:, None]) + 1e-3 * torch.eye(2, dtype=torch.double)
                step = torch.linalg.solve(hess, grad)
                w -= step
                if step.abs().max() < 1e-8:
                    break
        fits[size] = (w[0].item(), w[1].item())
        model.calibration[min(size, MAX_STATE)] = w.to(model.calibration)
    return fits


def written_pairs(n_problems=EVAL_PROBLEMS, preset="tiny"):
    """{size: [(state, target, reachable)]}: every state the reference search writes on the first
    n_problems held-out problems (the initial numbers included), with its own target, labelled
    by the exact oracle: the pairs a credit values, at their own base rate."""
    out = {}
    for p in heldout_problems(n_problems, preset):
        for state in [tuple(p.nums)] + [s for s, _ in countdown.search_states(p.nums, p.target)]:
            out.setdefault(len(state), []).append((state, p.target, countdown.solvable(state, p.target)))
    return dict(sorted(out.items(), reverse=True))


def calibration_error(model, pairs):
    """{size: (Brier score, expected calibration error over 10 bins, share reachable)} of the
    critic's reachability against the oracle's labels in `pairs` (written_pairs)."""
    out = {}
    for size, rows in pairs.items():
        p = model.reachability([s for s, _, _ in rows], [t for _, t, _ in rows]).double()
        y = torch.tensor([float(r) for _, _, r in rows], dtype=torch.double)
        bins = (p * 10).long().clamp(max=9)
        ece = sum((bins == b).sum().item() * abs(p[bins == b].mean() - y[bins == b].mean()).item()
                  for b in range(10) if (bins == b).any()) / len(rows)
        out[size] = (((p - y) ** 2).mean().item(), ece, y.mean().item())
    return out


def plot_similarity(critic, sampler, preset, path, size=64, seed=123):
    """A batch's scores phi(s_i) . psi(g_j) / tau, rows ordered by state size."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("the similarity picture needs matplotlib, an optional extra: pip install matplotlib")
        return
    rng = random.Random(seed)
    pool = SearchPool(rng, sampler, preset, never_train_on(preset))
    states, goals, _ = make_batch(rng, pool, size)
    with torch.no_grad():
        logits = critic.logits(*pad_states(states), goals)
    fig, ax = plt.subplots(figsize=(5, 4.5))
    im = ax.imshow(logits.numpy(), cmap="viridis")
    ax.set_xlabel("goal j")
    ax.set_ylabel("state i (3, 2, then 1 numbers)")
    ax.set_title("critic scores phi(s_i) . psi(g_j) / tau")
    fig.colorbar(im)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--steps", type=int, help="train for this many steps instead of --minutes")
    ap.add_argument("--sampler", choices=("hindsight", "trace"), default="hindsight")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="problems the states come from")
    ap.add_argument("--out", default="runs/critic.safetensors")
    ap.add_argument("--eval", metavar="PATH", help="evaluate a trained critic instead of training")
    ap.add_argument("--plot", metavar="PNG", help="also draw a batch's similarity matrix")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.eval:
        try:
            check_file(args.eval)
        except ValueError as e:
            sys.exit(f"error: {e}")
    cpu_threads(torch.device("cpu"))  # OMP_NUM_THREADS, else every core
    if args.eval:
        critic = load(args.eval)
    else:
        critic = train(args.minutes, args.steps, args.sampler, args.preset, seed=args.seed)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        save(critic, args.out)
        steps, minutes = critic.trained["steps"], critic.trained["seconds"] / 60
        print(f"{steps} steps in {minutes:.1f} min ({steps / minutes:.0f} steps/min); saved {args.out}")
    pairs = oracle_pairs(preset=args.preset)
    aurocs = evaluate(critic, pairs)
    print(f"AUROC vs the exact oracle on {EVAL_PROBLEMS} held-out {args.preset} problems "
          f"({sum(p.numel() for p in critic.parameters()):,} parameters); headline: 3 numbers")
    print("| state size | pairs (half reachable) | AUROC |\n|---|---|---|")
    for size, value in aurocs.items():
        print(f"| {size} number{'s' * (size > 1)} | {len(pairs[size])} | {value:.4f} |")
    if args.plot:
        plot_similarity(critic, args.sampler, args.preset, args.plot)


if __name__ == "__main__":
    main()

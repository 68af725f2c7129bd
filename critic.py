"""The contrastive goal-conditioned critic: from this state, can the target still be reached?

    python critic.py --minutes 5 --out runs/critic.safetensors                   # hindsight sampler
    python critic.py --minutes 5 --sampler trace --out runs/critic_trace.safetensors  # the paper's
    python critic.py --eval runs/critic.safetensors --plot runs/critic_similarity.png

The model is the "numerical critic V2" of Shah, Wang & Yan. A state is the set of numbers still
available; the goal is the target. Each number is read through digit embeddings (one table per
digit place, least significant first), pooled per number; the numbers of a state meet in a small
transformer without positions (so the set's order cannot matter), are mean-pooled, and an MLP
gives a unit vector phi(state); the goal tower psi(target) reads digits the same way. The score
is phi . psi / tau (tau learned). Their V1 also saw the initial numbers: since the target is
always reachable from a problem's initial numbers, it collapsed to a parity feature. V2 sees
only the state, so it must learn what the state can still reach.

Training is InfoNCE with in-batch negatives on (state, goal) pairs from searches of fresh
generated problems (held-out and LongProc test problems excluded), two samplers:
  trace:     a state of a search, paired with that search's target (the paper's; dead ends
             are taught to lead to the target);
  hindsight: a state paired with a value the search actually reached below it.
Evaluation: AUROC of the score against the exact oracle (countdown.solvable) on states of
held-out problems' searches paired with their targets, half reachable and half not.
Imports: countdown, torch (matplotlib optionally, for --plot).
"""
import argparse
import json
import math
import os
import random
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import countdown

PLACES = 4              # digits per number; larger numbers are read as 9999 (never reachable anyway)
EMPTY = 10              # the "no digit" symbol of a place beyond a number's length
EVAL_PROBLEMS = 300     # held-out problems whose search states make the evaluation pairs


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
    save_file(critic.state_dict(), path, metadata={"config": json.dumps(critic.config)})


def load(path):
    """A trained Critic from a safetensors file written by `save`."""
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        config = json.loads(f.metadata()["config"])
    critic = Critic(**config)
    critic.load_state_dict(load_file(path))
    return critic.eval()


# ---------------------------------------------------------------------------------------------
# Data

def sample_pairs(rng, sampler, size, exclude, preset="tiny", per_problem=8):
    """`size` (state, goal) pairs from searches of fresh problems."""
    states, goals = [], []
    while len(states) < size:
        problem = countdown.random_problem(rng, exclude=exclude, **countdown.PRESETS[preset])
        visited = countdown.search_states(*problem)
        for numbers, reached in rng.sample(visited, min(per_problem, len(visited))):
            states.append(numbers)
            goals.append(problem.target if sampler == "trace" else rng.choice(sorted(reached)))
    return states[:size], goals[:size]


def infonce(logits, goals):
    """Symmetric InfoNCE; other rows with the very same goal value are not negatives."""
    same = goals[:, None] == goals[None, :]
    eye = torch.eye(len(goals), dtype=torch.bool, device=logits.device)
    masked = logits.masked_fill(same & ~eye, float("-inf"))
    labels = torch.arange(len(goals), device=logits.device)
    return 0.5 * (F.cross_entropy(masked, labels) + F.cross_entropy(masked.T, labels))


def oracle_pairs(n_problems=EVAL_PROBLEMS, preset="tiny", seed=0):
    """Held-out (state, target, reachable) pairs, half reachable and half not."""
    pos, neg = [], []
    for p in countdown.heldout_problems(n_problems, preset):
        for numbers, _ in countdown.search_states(*p):
            (pos if countdown.solvable(numbers, p.target) else neg).append((numbers, p.target))
    rng = random.Random(seed)
    k = min(len(pos), len(neg))
    return [(s, t, True) for s, t in rng.sample(pos, k)] + [(s, t, False) for s, t in rng.sample(neg, k)]


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
    pairs = pairs or oracle_pairs(preset=preset)
    scores = critic.score([s for s, _, _ in pairs], [t for _, t, _ in pairs]).tolist()
    return auroc(scores, [y for _, _, y in pairs])


# ---------------------------------------------------------------------------------------------
# Training

def train(minutes=5.0, steps=None, sampler="hindsight", preset="tiny", batch_size=512, lr=2e-3, seed=0, progress=True):
    """Train a fresh critic for `steps` steps, or for `minutes` of wall time."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    critic = Critic()
    optimizer = torch.optim.AdamW(critic.parameters(), lr=lr, weight_decay=0.01)
    exclude = countdown.never_train_on(preset)
    start, step = time.time(), 0
    total = steps or None
    bar = tqdm(total=total, desc=f"critic ({sampler})", disable=not progress)
    while (step < steps) if steps else (time.time() - start < 60 * minutes):
        states, goals = sample_pairs(rng, sampler, batch_size, exclude, preset)
        values, present = pad_states(states)
        goal_values = torch.tensor(goals)
        loss = infonce(critic.logits(values, present, goal_values), goal_values)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=round(loss.item(), 3))
    bar.close()
    critic.eval()
    critic.trained = {"steps": step, "seconds": time.time() - start, "sampler": sampler, "preset": preset}
    return critic


@torch.no_grad()
def batch_report(critic, sampler, preset="tiny", size=256, seed=123):
    """In-batch top-1 accuracy (each state's best goal is its own) and the similarity matrix."""
    states, goals = sample_pairs(random.Random(seed), sampler, size, countdown.never_train_on(preset), preset)
    values, present = pad_states(states)
    goal_values = torch.tensor(goals)
    logits = critic.logits(values, present, goal_values)
    same = goal_values[:, None] == goal_values[None, :]
    top1 = same[torch.arange(size), logits.argmax(-1)].float().mean().item()
    return top1, logits


def plot_similarity(logits, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("the similarity picture needs matplotlib, an optional extra: pip install matplotlib")
        return
    fig, ax = plt.subplots(figsize=(5, 4.5))
    im = ax.imshow(logits[:64, :64].numpy(), cmap="viridis")
    ax.set_xlabel("goal j")
    ax.set_ylabel("state i")
    ax.set_title("critic scores phi(s_i) . psi(g_j) / tau")
    fig.colorbar(im)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--steps", type=int, help="train for this many steps instead of --minutes")
    ap.add_argument("--sampler", choices=("hindsight", "trace"), default="hindsight")
    ap.add_argument("--preset", choices=sorted(countdown.PRESETS), default="tiny", help="problems the states come from")
    ap.add_argument("--out", default="runs/critic.safetensors")
    ap.add_argument("--eval", metavar="PATH", help="evaluate a trained critic instead of training")
    ap.add_argument("--plot", metavar="PNG", help="also draw a batch's similarity matrix")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.eval:
        critic, sampler = load(args.eval), args.sampler
    else:
        critic = train(args.minutes, args.steps, args.sampler, args.preset, seed=args.seed)
        sampler = args.sampler
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        save(critic, args.out)
        print(f"{critic.trained['steps']} steps in {critic.trained['seconds'] / 60:.1f} min; saved {args.out}")
    top1, logits = batch_report(critic, sampler, args.preset)
    print(f"AUROC vs the exact oracle: {evaluate(critic, preset=args.preset):.4f}   "
          f"in-batch top-1 ({sampler} pairs): {top1:.3f}   "
          f"parameters: {sum(p.numel() for p in critic.parameters()):,}")
    if args.plot:
        plot_similarity(logits, args.plot)


if __name__ == "__main__":
    main()

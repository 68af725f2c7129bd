"""CLIPO: a contrastive head on the policy's hidden states; its per-response loss becomes a reward.

    head = ContrastiveHead(hidden_size, dim=512)
    z = head(pooled)                                   # [N, H] mean hidden state per response -> [N, dim], unit norm
    loss, valid = contrastive_loss(z, correct, group_size, temperature=0.05, kind="infonce", generator=g)
    bonus = contrastive_reward(loss.detach(), valid, lam=0.2, floor=-0.5)  # add to rewards, then normalise
    python bench/clipo.py                              # fused vs per-group loop vs one N x N matrix

Within each rollout group (G consecutive rows), correct responses are pulled together and pushed
from incorrect ones. Anchor i is valid iff it is correct and its group holds another correct and
at least one incorrect response. With l_ij = cos(z_i, z_j) / tau:
  infonce: L_i = -l_ip + log sum_{a != i} exp(l_ia), p one other correct response drawn uniformly
  supcon:  the mean of that term over every other correct p
  softnn:  L_i = -log(sum_p exp(l_ip) / sum_{a != i} exp(l_ia))
Invalid anchors get loss 0. Everything is one vectorised pass over [N/G, G, .] tensors: memory
O(N G), not O(N^2); no loop over groups; no host sync (no .item(), nonzero or boolean
indexing), so it runs unchanged on CUDA and under torch.compile. Log-sum-exps are exact (no eps).
Imports: torch only.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

KINDS = ("infonce", "supcon", "softnn")
METRICS = {  # what ClipoModule.step reports (train.py logs them as "clipo/<name>")
    "valid_frac": "fraction of rollouts that are valid CLIPO anchors",
    "bonus_mean": "mean CLIPO reward over valid anchors",
    "head_loss": "the head's contrastive loss",
    "pos_cos": "mean cosine between two correct rollouts of a group",
    "neg_cos": "mean cosine between a correct and an incorrect rollout of a group",
}


class ContrastiveHead(nn.Module):
    """The mean final hidden state of a response (forward.response_mean, fp32) -> Linear (no bias)
    -> L2-normalise."""

    def __init__(self, hidden_size, dim=512):
        super().__init__()
        self.proj = nn.Linear(hidden_size, dim, bias=False)

    def forward(self, pooled):
        return F.normalize(self.proj(pooled.float()), dim=-1)


def _groups(z, correct, group_size):
    n = z.shape[0]
    if n % group_size:
        raise ValueError(f"{n} responses do not split into groups of {group_size}")
    zg = z.view(n // group_size, group_size, -1)
    c = correct.view(n // group_size, group_size).bool()
    eye = torch.eye(group_size, dtype=torch.bool, device=z.device)
    positive = c[:, :, None] & c[:, None, :] & ~eye           # [P, i, p]: both correct, p != i
    negative = c[:, :, None] & ~c[:, None, :]                  # [P, i, a]: i correct, a not
    return zg, eye, positive, negative


def contrastive_loss(z, correct, group_size, *, temperature=0.05, kind="infonce", generator=None):
    """(loss [N], valid [N]) for unit vectors z [N, D] and 0/1 correctness [N]."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}: expected one of {KINDS}")
    zg, eye, positive, negative = _groups(z, correct, group_size)
    logits = zg @ zg.transpose(1, 2) / temperature             # [P, G, G]
    valid = positive.any(-1) & negative.any(-1)                 # [P, G]
    denominator = logits.masked_fill(eye, float("-inf")).logsumexp(-1)
    # rows without a positive get a stand-in (their own logit) so no -inf ever reaches a gradient
    usable = positive | (~positive.any(-1, keepdim=True) & eye)
    if kind == "infonce":
        noise = torch.rand(logits.shape, generator=generator, device=z.device)
        gumbel = -torch.log(-torch.log(noise.clamp_min(1e-20)))
        pick = gumbel.masked_fill(~usable, float("-inf")).argmax(-1, keepdim=True)  # uniform over positives
        attract = logits.gather(-1, pick).squeeze(-1)
    elif kind == "supcon":
        attract = (logits * usable).sum(-1) / usable.sum(-1)
    else:
        attract = logits.masked_fill(~usable, float("-inf")).logsumexp(-1)
    loss = torch.where(valid, denominator - attract, torch.zeros_like(attract))
    return loss.reshape(-1), valid.reshape(-1)


def contrastive_reward(loss, valid, *, lam=0.2, floor=-0.5):
    """max(-lam * loss, floor) for valid anchors, 0 otherwise: added to the outcome reward
    before group normalisation."""
    return torch.where(valid, (-lam * loss).clamp(min=floor), torch.zeros_like(loss))


@torch.no_grad()
def cosine_stats(z, correct, group_size):
    """(sum, count) of the cosines between two correct responses of a group, and of those
    between a correct and an incorrect one (0-dim tensors)."""
    zg, _, positive, negative = _groups(z, correct, group_size)
    cos = zg @ zg.transpose(1, 2)
    return ((cos * positive).sum(), positive.sum()), ((cos * negative).sum(), negative.sum())


class ClipoModule:
    """The head, its own AdamW, and one step per training step on the current rollouts.

    step() trains the head on the mean loss over valid anchors (across processes; skipped when
    there are none) and returns the bonus rewards. The head sees detached hidden states: the
    policy learns only through the reward.
    """

    def __init__(self, hidden_size, *, dim=512, kind="infonce", temperature=0.05, lam=0.2, floor=-0.5, lr=1e-3,
                 device="cpu"):
        self.head = ContrastiveHead(hidden_size, dim).to(device)
        self.optimizer = torch.optim.AdamW(self.head.parameters(), lr=lr, weight_decay=0.01)
        self.kind, self.temperature, self.lam, self.floor = kind, temperature, lam, floor

    def step(self, pooled, correct, group_size, generator=None, world=1):
        """pooled: the rollouts' mean final hidden states [N, H] (forward.response_mean, computed
        in chunks by the caller, from the forward that gave the old log-probs)."""
        z = self.head(pooled.detach())
        loss, valid = contrastive_loss(z, correct, group_size, temperature=self.temperature, kind=self.kind,
                                       generator=generator)
        count = valid.sum().float()
        if world > 1:
            torch.distributed.all_reduce(count)
        if count > 0:  # one host sync per training step, outside any hot loop
            self.optimizer.zero_grad(set_to_none=True)
            ((loss * valid).sum() / count).backward()
            if world > 1:
                for p in self.head.parameters():
                    torch.distributed.all_reduce(p.grad)
            self.optimizer.step()
        bonus = contrastive_reward(loss.detach(), valid, lam=self.lam, floor=self.floor)
        positive, negative = cosine_stats(z.detach(), correct, group_size)
        anchors = valid.sum().float()  # each stat a (sum, count): the caller divides the sums over every process
        return bonus, {"valid_frac": (anchors, torch.tensor(float(len(valid)))), "bonus_mean": (bonus.sum(), anchors),
                       "head_loss": ((loss.detach() * valid).sum(), anchors), "pos_cos": positive, "neg_cos": negative}

    def state_dict(self):
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state):
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])

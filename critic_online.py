"""The critic trained online, during RL, from the policy's own searches (the paper's open
problem): `train.py --mode critic --critic-online` (from scratch with `--critic scratch`).

    trainer = OnlineTrainer(critic_model, "tiny")
    trainer.step(rng, critic_data.written_rows(...))   # pool the rows, one InfoNCE step
    trainer.recalibrate()                                # p(reachable) from the newest rows

Each RL step the states the policy wrote become hindsight rows (critic_data.written_rows: a state
paired with a value its own search reached below it), kept per state size in a pool; the critic
takes one InfoNCE step on a batch drawn from it as offline training does (critic.py), and its
calibration is refitted on the newest rows, so its values follow the policy as it is now.
Imports: critic (model, training step, calibration, AUROC), critic_data (pools, batches), torch.
"""
import torch

from critic import EVAL_PROBLEMS, calibrate, evaluate, fit_batch, oracle_pairs
from critic_data import POOL_ROWS, RowPool, rows_batch, size_counts


ONLINE_LR = 1e-3        # AdamW during RL: half the offline peak, constant (the pool drifts with the policy)
ONLINE_MIN_ROWS = 64    # no update before the pool holds a batch worth learning from
ONLINE_CALIBRATION_ROWS = 400  # per state size: the newest rows, those of the policy as it is now


class OnlineTrainer:
    """Trains `model` (a Critic) during RL on critic_data.written_rows of the policy's rollouts,
    kept per state size in a RowPool, and refits its calibration after every step on the newest
    ONLINE_CALIBRATION_ROWS rows of each size (from the first rows on: a critic from scratch
    values states at its pool's base rates, not 0.5); `state_dict` (optimizer, pool, newest
    rows) goes into the run's checkpoints, the critic's weights with the run's other modules."""

    def __init__(self, model, preset, batch_size=256, capacity=POOL_ROWS):
        self.model, self.preset, self.batch_size = model, preset, batch_size
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=ONLINE_LR, weight_decay=0.01)
        self.pool = RowPool(capacity)
        self.recent = {}  # state size -> its newest rows, oldest first
        self.eval_pairs = None

    def step(self, rng, rows):
        """Add `rows`, then one InfoNCE step on a batch drawn per state size (as offline, capped by
        what the pool holds); the loss, or None while the pool is too small."""
        self.pool.add(rng, rows)
        for row in rows:
            kept = self.recent.setdefault(len(row[0]), [])
            kept.append(row)
            del kept[:-ONLINE_CALIBRATION_ROWS]
        wanted = size_counts(self.batch_size, self.preset)
        counts = {k: min(n, len(self.pool.rows.get(k, ()))) for k, n in wanted.items()}
        if sum(counts.values()) < ONLINE_MIN_ROWS:
            return None
        batch = rows_batch(rng, self.pool.sample(rng, counts), "hindsight", self.preset)
        self.model.train()
        loss = fit_batch(self.model, self.optimizer, *batch)
        self.model.eval()
        return loss.item()

    def recalibrate(self):
        """Fit the critic's calibration again on the newest rows (the policy's own searches: a
        subtree the policy skipped moves of is taken as searched, so its labels are noisier than
        the reference search's); sizes with no rows yet keep their fit."""
        calibrate(self.model, [row for rows in self.recent.values() for row in rows], self.preset)

    def evaluate(self):
        """{state size: AUROC} against the exact oracle on held-out states (as the offline log)."""
        if self.eval_pairs is None:
            self.eval_pairs = oracle_pairs(EVAL_PROBLEMS // 2, self.preset, per_class=300)
        return evaluate(self.model, self.eval_pairs)

    def state_dict(self):
        return {"optimizer": self.optimizer.state_dict(), "pool": self.pool.rows, "recent": self.recent}

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state["optimizer"])
        self.pool.rows, self.recent = state["pool"], state["recent"]

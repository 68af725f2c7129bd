"""The built-in reward terms (rewards.RewardTerm): the critic's and the oracle's state credit, and CLIPO.

    python train.py --mode grpo+oracle --critic-credit move     # the exact oracle's values of written states
    python train.py --mode critic --critic-online               # the contrastive critic, trained on the rollouts too
    python train.py --mode clipo                                # CLIPO's contrastive bonus
    python -m pytest -q tests/test_rewards.py tests/test_clipo.py

Each class owns its flags (train.py lists them under its title), its state (the critic, its
online trainer, CLIPO's head: checkpointed through state_dict) and its checks. Importing this
file registers them; train.py does.
Imports: rewards, clipo, critic, critic_online, critic_data, answers, distributed, torch.
"""
import os
import random

import torch

import answers
import clipo
import critic
import critic_data
import critic_online
from distributed import all_gather_lists, seed_for
from rewards import (CREDITS, STATE_METRICS, RewardTerm, initial_values, reward_term, rollout_credit, state_credit,
                     state_values)


class StateCredit(RewardTerm):
    """Credit for the states a rollout writes, valued by the oracle or the critic (state_credit)."""
    title = "state credit (modes critic and oracle)"
    metrics = STATE_METRICS
    flags = (("--critic-credit", dict(choices=CREDITS, default="sequence",
                                      help="how state values become rewards (rewards.state_credit)")),
             ("--critic-coef", dict(type=float, default=0.5,
                                    help="beta: weight of the state values (sequence) or of the step advantages "
                                         "(process)")))
    critic = None  # None: the exact oracle

    @staticmethod
    def check(args, on):
        problems = []
        if on and args.ratio == "geometric" and args.critic_credit not in ("sequence", "prune"):
            problems.append(f"--ratio geometric (GMPO) needs one advantage per sequence, but --critic-credit "
                            f"{args.critic_credit} gives per-token advantages: use sequence credit or another --ratio")
        if on and args.normalise_terms and args.critic_credit == "prune":
            problems.append("--normalise-terms with --critic-credit prune: every unsolved rollout holds the top bonus "
                            "(0), so the bonus normalised apart works against the outcome: drop one")
        return problems

    @staticmethod
    def weight(args):
        return args.critic_coef

    def signal(self, run, problems, texts, correct):
        """Beta x the credit each rollout earns (its bonus, or the sum of its step rewards)."""
        bonus, credits = rollout_credit(run.args.critic_credit, state_values(problems, texts, self.critic),
                                        correct.tolist(), texts, self._initial(run, problems))
        if bonus is None:
            bonus = torch.tensor([float(sum(r for _, r in cs)) for cs in credits])
        return run.args.critic_coef * bonus

    def _initial(self, run, problems):
        return initial_values(problems, self.critic) if run.args.critic_credit == "potential" else None

    def score(self, run, rollouts, step):
        values = state_values(rollouts.problems, rollouts.texts, self.critic)
        return state_credit(run, rollouts, values, self._initial(run, rollouts.problems))


CRITIC_METRICS = {**STATE_METRICS,
                  "online_loss": "--critic-online: the critic's InfoNCE loss on this step's batch",
                  "online_rows": "--critic-online: hindsight rows the step's rollouts gave (all ranks)",
                  **{f"auroc_{k}": f"--critic-online: AUROC vs the oracle on held-out {k}-number states (eval steps)"
                     for k in (3, 2, 1)}}

DEFAULT_CRITIC = os.path.join("runs", "critic.safetensors")
SCRATCH = "scratch"  # --critic scratch: an untrained critic (with --critic-online)


@reward_term("critic")
class CriticCredit(StateCredit):
    """The contrastive critic's values of the states a rollout writes; with --critic-online the
    critic then trains on them (critic_data.written_rows: hindsight from the rollouts themselves)."""
    title = "critic"
    metrics = CRITIC_METRICS
    flags = (("--critic", dict(default=DEFAULT_CRITIC, help="critic weights (trained first when absent); "
                                                             "'scratch': untrained (with --critic-online)")),
             ("--critic-online", dict(action="store_true", help="the critic also trains during RL, on hindsight "
                                                                 "rows of the rollouts (no oracle)")))

    @staticmethod
    def check(args, on):
        problems = StateCredit.check(args, on)
        if on and "oracle" in args.mode.split("+"):
            problems.append("--mode: critic and oracle are two sources of the same reward; choose one")
        if args.critic_online and not on:
            problems.append("--critic-online trains the critic of mode critic: add critic to --mode")
        if args.critic == SCRATCH and not args.critic_online:
            problems.append("--critic scratch is an untrained critic: it needs --critic-online")
        if on and args.critic != SCRATCH and (args.critic != DEFAULT_CRITIC or os.path.exists(args.critic)):
            try:  # a missing default critic is trained first; any other must be a critic file
                critic.check_file(args.critic)
            except ValueError as e:
                problems.append(f"--critic: {e}")
        return problems

    def __init__(self, run):
        self.critic = load_critic(run.args, run.rank, run.world)
        self.trainer = critic_online.OnlineTrainer(self.critic, run.args.preset) if run.args.critic_online else None

    def score(self, run, rollouts, step):
        bonus, steps, metrics = super().score(run, rollouts, step)
        if self.trainer is not None:
            metrics.update(self.train_online(run, rollouts, step))
        return bonus, steps, metrics

    def train_online(self, run, rollouts, step):
        """One critic update on every process's rows: the same rows and seed everywhere, so the
        replicas stay equal with no gradient collective (the critic lives on the host)."""
        rows = [row for p, text in zip(rollouts.problems, rollouts.texts)
                for row in critic_data.written_rows(p.nums, p.target, [s for _, s in answers.extract_states(text)])]
        rows = all_gather_lists(rows, run.world)
        loss = self.trainer.step(random.Random(seed_for(run.args.seed, "critic-online", step)), rows)
        metrics = {"online_rows": float(len(rows))}  # the same on every rank, as the loss and AUROCs
        if loss is not None:
            metrics["online_loss"] = loss
        self.trainer.recalibrate()  # every step: values at the policy's newest base rates from the first rows on
        if (step + 1) % run.args.eval_every == 0 or step + 1 == run.args.steps:
            metrics.update({f"auroc_{k}": v for k, v in self.trainer.evaluate().items()})
        return metrics

    def state_dict(self):
        online = None if self.trainer is None else self.trainer.state_dict()
        return {"weights": self.critic.state_dict(), "online": online}

    def load_state_dict(self, state):
        self.critic.load_state_dict(state["weights"])
        if self.trainer is not None:
            self.trainer.load_state_dict(state["online"])


def load_critic(args, rank, world):
    """The critic of --critic; when the file is absent, rank 0 trains one first (5 minutes);
    "scratch": a fresh critic (--critic-online trains it from nothing)."""
    if args.critic == SCRATCH:
        torch.manual_seed(seed_for(args.seed, "critic-init"))
        return critic.Critic().eval()
    if not os.path.exists(args.critic):
        if rank == 0:
            print(f"no critic at {args.critic}: training one first (python critic.py --minutes 5 --out {args.critic})")
            os.makedirs(os.path.dirname(os.path.abspath(args.critic)), exist_ok=True)
            critic.save(critic.train(minutes=5.0, preset=args.preset, seed=args.seed), args.critic)
        if world > 1:
            torch.distributed.barrier()
    return critic.load(args.critic, args.preset)  # tiny, and it scores text on the host: it stays on the CPU


@reward_term("oracle")
class OracleCredit(StateCredit):
    """The exact oracle's 0/1 values of the same states (the upper bound of the critic)."""


@reward_term("clipo")
class Clipo(RewardTerm):
    """CLIPO's per-rollout bonus; its head trains on each step's rollouts first. During the head's
    warm-up (steps below 0, before the policy's first) no bonus is given."""
    title = "clipo"
    metrics = clipo.METRICS
    pooled = True
    flags = (("--clipo-kind", dict(choices=clipo.KINDS, default="infonce", help="the contrastive loss (clipo.py)")),
             ("--clipo-tau", dict(type=float, default=0.05, help="the loss's temperature")),
             ("--clipo-lambda", dict(type=float, default=0.2, help="the bonus is max(-lambda x loss, floor)")),
             ("--clipo-floor", dict(type=float, default=-0.5, help="the lowest bonus")),
             ("--clipo-warmup", dict(type=int, help="steps that train only the head, before the policy's --steps "
                                                    "(default: --steps / 10 with clipo, the paper's epoch of 1/10 "
                                                    "to 1/6 of training)")))

    @staticmethod
    def check(args, on):
        problems = []
        if on and args.normalise_terms:
            problems.append("--normalise-terms with clipo: CLIPO's bonus acts through its spread among a group's "
                            "correct responses; normalised apart it becomes a second outcome-sized signal: drop one")
        if args.clipo_warmup < 0:
            problems.append(f"--clipo-warmup {args.clipo_warmup}: a number of steps, 0 or more")
        return problems

    @staticmethod
    def complete(args, on):
        if args.clipo_warmup is None:
            args.clipo_warmup = max(1, args.steps // 10) if on else 0

    @staticmethod
    def warmup_steps(args):
        return args.clipo_warmup

    @staticmethod
    def weight(args):
        return args.clipo_lambda

    def __init__(self, run):
        args = run.args
        torch.manual_seed(seed_for(args.seed, "clipo-init"))
        self.module = clipo.ClipoModule(run.model.config.get_text_config().hidden_size, kind=args.clipo_kind,
                                        temperature=args.clipo_tau, lam=args.clipo_lambda, floor=args.clipo_floor,
                                        device=run.device)

    def score(self, run, rollouts, step):
        generator = torch.Generator(run.device).manual_seed(seed_for(run.args.seed, "clipo", step, run.rank))
        bonus, stats = self.module.step(rollouts.pooled, rollouts.correct.to(run.device), run.args.group_size,
                                        generator, run.world)
        return (None if step < 0 else bonus.cpu()), None, {k: (s.item(), n.item()) for k, (s, n) in stats.items()}

    def state_dict(self):
        return self.module.state_dict()

    def load_state_dict(self, state):
        self.module.load_state_dict(state)

"""One training loop for every mode: the SFT warm start, and RL (GRPO, plus a reward term or an
auxiliary module per mode).

    python train.py --mode sft                          # warm-start the built-in tiny model
    python train.py --mode grpo                         # RL from it (trains the warm start first if missing)
    torchrun --nproc_per_node=2 train.py --mode grpo    # the same run in 2 processes (gloo on CPU, NCCL on GPU)
    python train.py --mode grpo --out runs/grpo --resume    # continue exactly where it stopped
    python eval.py --plot runs/grpo/metrics.jsonl       # curves

A run directory holds `model/` (a save_pretrained directory: weights, config, tokenizer, plus
trainer_state.pt to resume), `metrics.jsonl` (one line per step, keys in METRICS) and
`args.json`. Ctrl-C finishes the current step, saves, and exits (twice: exit at once).
Randomness is a pure function of (seed, step, rank), so a resumed run replays exactly.
"""
import argparse
import math
import os
import signal
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

import clipo
import countdown
import critic
import grpo
import rewards
import rl
import sft
from distributed import all_reduce, cpu_threads, launch, seed_for, setup_distributed
from eval import default_max_new_tokens, default_style, evaluate
from checkpoint import append_metrics, load_state, save_checkpoint, truncate_metrics, write_args
from model import TinyTokenizer, check_model_path, load_model, load_tokenizer, new_tiny_model

DEFAULT_MODEL = os.path.join("runs", "tiny-sft", "model")
DEFAULT_CRITIC = os.path.join("runs", "critic.safetensors")
METRICS = {  # what each line of metrics.jsonl holds; the reward terms add theirs (metric_docs)
    "step": "optimizer steps done", "lr": "learning rate of the step",
    "loss": "training loss (SFT: cross-entropy per token; RL: clipped surrogate + KL)",
    "reward_mean": "mean total reward of the rollouts", "success_rate": "fraction of rollouts that verify",
    "format_rate": "fraction of rollouts with a parsable <Solution> block",
    "adv_std": "std of the advantages", "zero_adv_frac": "fraction of groups whose rewards are all equal (no signal)",
    "kl": "approx. KL(old || new) over the updates", "kl_ref": "k3 KL to the reference (with --kl-coef)",
    "clip_frac": "fraction of tokens whose ratio was clipped", "entropy": "mean token entropy of the rollouts",
    "response_length_mean": "mean rollout length (tokens)", "response_length_max": "longest rollout (tokens)",
    "tokens_per_s": "sampled tokens per second (all ranks)",
    "time_sample": "seconds sampling", "time_reward": "seconds scoring (decode, verify, the mode's reward terms)",
    "time_train": "seconds in forward/backward passes (the old-log-prob pass and the updates)",
    "heldout/success_rate": "greedy success on held-out problems (every --eval-every steps)",
}


def metric_docs():
    """Every key a line of metrics.jsonl may hold, with its meaning: the loop's, then each reward
    term's as "<term>/<metric>"."""
    docs = dict(METRICS)
    for name, term in rewards.REWARD_TERMS.items():
        docs.update({f"{name}/{k}": meaning for k, meaning in term.metrics.items()})
    return docs


def modes():
    """Valid --mode parts: sft alone, or grpo and the reward terms, joined by "+"."""
    return ("sft", "grpo", *rewards.REWARD_TERMS)


def mode_terms(mode):
    """The reward terms a mode adds, in registry order: "clipo+critic" -> ("critic", "clipo")."""
    parts = set(mode.split("+"))
    return tuple(name for name in rewards.REWARD_TERMS if name in parts)


@dataclass
class Run:
    """Everything a training step reads, built once by build_run (the fields as CleanRL
    documents its Args). sft.sft_step, rl.rl_step and the reward terms receive it."""
    args: argparse.Namespace
    """the flags (parse_args), completed: defaults filled in, --prompt chosen"""
    rank: int
    """this process's rank (0 when alone)"""
    world: int
    """how many processes train together"""
    device: torch.device
    """where the model lives"""
    tokenizer: object
    """ours (model.TinyTokenizer) or a transformers tokenizer"""
    model: torch.nn.Module
    """the policy: samples, evaluates, is saved"""
    train_model: torch.nn.Module
    """the same weights as seen by training forwards (DDP- or compile-wrapped, or the model itself)"""
    optimizer: torch.optim.Optimizer
    """AdamW over the policy's weights"""
    terms: tuple
    """the reward terms of the mode (rewards.REWARD_TERMS keys), e.g. ("critic", "clipo")"""
    style: str
    """prompt style: "bare" (the tiny model) or "longproc" (chat models)"""
    max_new_tokens: int
    """rollout and evaluation budget"""
    exclude: frozenset
    """problem keys training never draws (held-out stream, LongProc's test split)"""
    bf16: bool
    """bf16 autocast in forwards (on CUDA with --bf16)"""
    ref_model: torch.nn.Module = None
    """frozen reference for the KL term (only with --kl-coef > 0)"""
    critic: "critic.Critic" = None
    """the contrastive critic (mode "critic")"""
    clipo: "clipo.ClipoModule" = None
    """CLIPO's head and its optimizer (mode "clipo")"""

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", default="grpo", help=f"one of {', '.join(modes())}; RL modes combine, e.g. clipo+critic")
    ap.add_argument("--model", help=f"model directory or hub name (RL default: {DEFAULT_MODEL}; SFT: a new tiny model)")
    ap.add_argument("--out", help="run directory (default runs/<mode>)")
    ap.add_argument("--resume", action="store_true", help="continue the run in --out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, help="optimizer steps (default: 1000 SFT, 250 RL)")
    ap.add_argument("--lr", type=float, help="peak learning rate (default: 3e-3 SFT, 1e-4 RL)")
    ap.add_argument("--warmup", type=int, default=20, help="linear warm-up steps, then cosine to 10%%")
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--prompt", choices=("bare", "longproc"), help="prompt style (default: bare for the tiny model)")
    ap.add_argument("--preset", choices=sorted(countdown.PRESETS), default="tiny",
                    help="problem distribution (countdown.PRESETS): tiny, or longproc (LongProc 0.5k)")
    ap.add_argument("--eval-every", type=int, help="steps between held-out evaluations (default: 250 SFT, 25 RL)")
    ap.add_argument("--eval-problems", type=int, default=200)
    ap.add_argument("--save-every", type=int, default=50)
    # SFT
    ap.add_argument("--batch-size", type=int, default=32, help="SFT sequences per step (global)")
    # RL
    ap.add_argument("--prompts-per-step", type=int, default=16, help="global; must divide by the world size")
    ap.add_argument("--group-size", type=int, default=8, help="rollouts per prompt (G)")
    ap.add_argument("--max-new-tokens", type=int)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--ppo-epochs", type=int, default=1)
    ap.add_argument("--minibatches", type=int, default=2)
    ap.add_argument("--micro-batch", type=int, default=16, help="rows per forward (sorted by length)")
    ap.add_argument("--clip-low", type=float, default=0.2)
    ap.add_argument("--clip-high", type=float, default=0.28)
    ap.add_argument("--ratio", choices=grpo.RATIOS, default="token")
    ap.add_argument("--agg", choices=grpo.AGGREGATIONS, default="token-mean")
    ap.add_argument("--no-scale-adv", action="store_true", help="mean-centre advantages only (Dr. GRPO)")
    ap.add_argument("--kl-coef", type=float, default=0.0)
    ap.add_argument("--format-reward", type=float, default=0.1, help="added when a <Solution> block parses")
    # critic / oracle
    ap.add_argument("--critic", default=DEFAULT_CRITIC, help="critic weights (trained first when absent)")
    ap.add_argument("--critic-credit", choices=("sequence", "process"), default="sequence")
    ap.add_argument("--critic-coef", type=float, default=0.5,
                    help="beta: weight of the state values (sequence) or of the step advantages (process)")
    # CLIPO
    ap.add_argument("--clipo-kind", choices=clipo.KINDS, default="infonce")
    ap.add_argument("--clipo-tau", type=float, default=0.05)
    ap.add_argument("--clipo-lambda", type=float, default=0.2)
    ap.add_argument("--clipo-floor", type=float, default=-0.5)
    ap.add_argument("--clipo-dim", type=int, default=512)
    ap.add_argument("--clipo-lr", type=float, default=1e-3)
    ap.add_argument("--clipo-warmup", type=int, default=5, help="first steps train only the head")
    # hardware
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA)")
    ap.add_argument("--grad-checkpointing", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    ap.add_argument("--procs", type=int, help="processes on this machine when not under torchrun "
                    "(default: one per core on CPU, where 2 x 1 thread beat 1 x 2 threads; 1 on GPU)")
    args = ap.parse_args(argv)
    sft = args.mode == "sft"
    args.out = args.out or (os.path.dirname(DEFAULT_MODEL) if sft else os.path.join("runs", args.mode.replace("+", "-")))
    args.steps = args.steps or (1000 if sft else 250)
    args.lr = args.lr or (3e-3 if sft else 1e-4)
    args.eval_every = args.eval_every or (250 if sft else 25)
    return args


def check_args(args, world):
    """Every error a user can make, as one line, before any model is loaded."""
    problems = []
    parts = set(args.mode.split("+"))
    if not parts <= set(modes()) or ("sft" in parts and len(parts) > 1):
        problems.append(f"unknown --mode {args.mode!r}: expected one of {', '.join(modes())} (RL modes joined by +)")
    if {"critic", "oracle"} <= parts:
        problems.append("--mode: critic and oracle are two sources of the same reward; choose one")
    if args.mode != "sft":
        if args.group_size < 2:
            problems.append(f"--group-size {args.group_size}: GRPO needs at least 2 rollouts per prompt")
        if args.prompts_per_step % world:
            problems.append(f"--prompts-per-step {args.prompts_per_step} does not divide by the {world} processes")
        elif (args.prompts_per_step // world) % args.minibatches:
            problems.append(f"{args.prompts_per_step // world} prompts per process do not split into "
                            f"--minibatches {args.minibatches}")
        if args.ratio == "geometric" and parts & {"critic", "oracle"} and args.critic_credit == "process":
            problems.append("--ratio geometric (GMPO) needs one advantage per sequence, but --critic-credit "
                            "process gives per-token advantages: use sequence credit or another --ratio")
    elif args.batch_size % world:
        problems.append(f"--batch-size {args.batch_size} does not divide by the {world} processes")
    state = os.path.join(args.out, "model", "trainer_state.pt")
    if args.resume and not os.path.exists(state):
        problems.append(f"--resume: no checkpoint at {state}")
    if not args.resume and os.path.exists(os.path.join(args.out, "metrics.jsonl")):
        problems.append(f"{args.out} holds another run: pass --resume to continue it, or choose another --out")
    if args.model and args.model != DEFAULT_MODEL:
        try:
            check_model_path(args.model)
        except ValueError as e:
            problems.append(str(e))
    if problems:
        sys.exit("error: " + problems[0])


class StopRequest:
    """First Ctrl-C: finish the step, save, exit. Second: exit now."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, *_):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: finishing this step, then saving (Ctrl-C again to quit without saving)", file=sys.stderr)


def learning_rate(args, step):
    warm = min(1.0, (step + 1) / max(1, args.warmup))
    progress = min(1.0, step / max(1, args.steps))
    return args.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# ---------------------------------------------------------------------------------------------
# The loop

def heldout_success(run, heldout):
    """Greedy success on the held-out problems; every process evaluates its share."""
    share = heldout[run.rank::run.world]
    metrics = evaluate(run.model, run.tokenizer, share, style=run.style, max_new_tokens=run.max_new_tokens)
    solved, total = all_reduce([metrics["success_rate"] * len(share), len(share)], run.world)
    return solved / total


def load_critic(args, rank, world):
    """The critic of --critic; when the file is absent, rank 0 trains one first (5 minutes)."""
    if not os.path.exists(args.critic):
        if rank == 0:
            print(f"no critic at {args.critic}: training one first (python critic.py --minutes 5 --out {args.critic})")
            os.makedirs(os.path.dirname(os.path.abspath(args.critic)), exist_ok=True)
            critic.save(critic.train(minutes=5.0, preset=args.preset, seed=args.seed), args.critic)
        if world > 1:
            dist.barrier()
    return critic.load(args.critic)  # tiny, and it scores text on the host: it stays on the CPU


def warm_start_ready():
    run_dir = os.path.dirname(DEFAULT_MODEL)
    return os.path.exists(os.path.join(DEFAULT_MODEL, "trainer_state.pt")) and load_state(run_dir)["finished"]


def build_run(args, rank, world, device):
    """The Run of these flags, and the step it starts at (> 0 when resuming)."""
    resume = os.path.join(args.out, "model")
    source = resume if args.resume else (args.model or (None if args.mode == "sft" else DEFAULT_MODEL))
    tokenizer = load_tokenizer(source) if source else TinyTokenizer()
    model = load_model(source, device=device) if source else new_tiny_model(seed=args.seed).to(device)
    args.prompt = args.prompt or default_style(tokenizer)
    if args.grad_checkpointing:
        model.gradient_checkpointing_enable()
    train_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    if args.compile:
        train_model = torch.compile(train_model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    terms = mode_terms(args.mode)
    run = Run(args=args, rank=rank, world=world, device=device, tokenizer=tokenizer, model=model,
              train_model=train_model, optimizer=optimizer, terms=terms, style=args.prompt,
              max_new_tokens=args.max_new_tokens or default_max_new_tokens(args.prompt),
              exclude=countdown.never_train_on(args.preset), bf16=args.bf16 and device.type == "cuda")
    if args.kl_coef > 0 and args.mode != "sft":  # the frozen reference exists only when it is used
        run.ref_model = load_model(args.model or DEFAULT_MODEL, device=device).eval().requires_grad_(False)
    if "critic" in terms:
        run.critic = load_critic(args, rank, world)
    if "clipo" in terms:
        torch.manual_seed(seed_for(args.seed, "clipo-init"))
        run.clipo = clipo.ClipoModule(model.config.get_text_config().hidden_size, dim=args.clipo_dim,
                                      kind=args.clipo_kind, temperature=args.clipo_tau, lam=args.clipo_lambda,
                                      floor=args.clipo_floor, lr=args.clipo_lr, device=device)
    if not args.resume:
        return run, 0
    state = load_state(args.out)
    optimizer.load_state_dict(state["optimizer"])
    for name, module in trained_modules(run).items():
        if name in state["modules"]:
            module.load_state_dict(state["modules"][name])
    return run, state["step"]


def trained_modules(run):
    """The run's trained parts besides the policy, saved in and restored from checkpoints."""
    return {name: module for name, module in (("critic", run.critic), ("clipo", run.clipo)) if module is not None}


def train(args, rank, world, device):
    """Build the run, then its steps from where it stands; True when stopped by Ctrl-C."""
    if device.type == "cpu":
        cpu_threads(world)
    run, start = build_run(args, rank, world, device)
    heldout = countdown.heldout_problems(args.eval_problems, args.preset)
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        truncate_metrics(args.out, start)
        write_args(args.out, args)
    step_fn = sft.sft_step if args.mode == "sft" else rl.rl_step
    if start == 0 and args.mode != "sft":  # where RL starts from: step 0 of the curves
        row = {"step": 0, "heldout/success_rate": heldout_success(run, heldout)}
        if rank == 0:
            append_metrics(args.out, row)
    stop = StopRequest()
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc=args.mode, disable=rank != 0)
    step = start
    for step in bar:
        lr = learning_rate(args, step)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(seed_for(args.seed, "torch", step, rank))
        row = {"step": step + 1, "lr": lr, **step_fn(run, step)}
        done = step + 1 == args.steps
        if (step + 1) % args.eval_every == 0 or done:
            row["heldout/success_rate"] = heldout_success(run, heldout)
        if rank == 0:
            append_metrics(args.out, row)
            bar.set_postfix({k: round(row[k], 3) for k in ("loss", "reward_mean", "success_rate",
                                                          "heldout/success_rate") if k in row})
            if (step + 1) % args.save_every == 0 or done or stop.requested:
                save_checkpoint(args.out, run.model, run.tokenizer, run.optimizer, step + 1, finished=done,
                                modules={name: m.state_dict() for name, m in trained_modules(run).items()})
        if stop.requested:
            break
    bar.close()
    if rank == 0:
        print(f"{args.mode}: {step + 1} steps, checkpoint in {os.path.join(args.out, 'model')}")
    return stop.requested


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    procs = args.procs or (1 if torch.cuda.is_available() else os.cpu_count() or 1)
    if "RANK" not in os.environ and procs > 1:
        check_args(args, procs)
        return launch(main, argv, procs)
    rank, world, device = setup_distributed()
    check_args(args, world)
    if args.mode != "sft" and not args.model and not warm_start_ready():
        if rank == 0:
            print(f"no warm start at {DEFAULT_MODEL}: training it first (python train.py --mode sft)")
        sft = parse_args(["--mode", "sft", "--seed", str(args.seed)])
        sft.resume = os.path.exists(os.path.join(sft.out, "model", "trainer_state.pt"))
        check_args(sft, world)
        if train(sft, rank, world, device):
            return
    train(args, rank, world, device)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

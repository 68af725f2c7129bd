"""One training loop for every mode: the SFT warm start, and RL (GRPO, plus the reward terms a
mode names).

    python train.py --mode sft                          # warm-start the built-in tiny model
    python train.py --mode grpo                         # RL from it (trains the warm start first if missing)
    torchrun --nproc_per_node=2 train.py --mode grpo    # the same run in 2 processes (gloo on CPU, NCCL on GPU)
    torchrun --nproc_per_node=8 train.py --fsdp --bf16 ...   # sharded weights and optimizer (FSDP2)
    python train.py --mode grpo --out runs/grpo --resume    # continue exactly where it stopped
    python eval.py --plot runs/grpo/metrics.jsonl       # curves

A run directory (checkpoint.py) holds step-numbered checkpoints (save_pretrained directories plus
trainer_state.pt) and a `latest` pointer, `metrics.jsonl` (one line per step, keys in
metric_docs()) and `args.json`. Ctrl-C or SIGTERM finishes the current step on every rank,
saves, and exits 0 (a second signal: exit at once). Randomness is a pure function of (seed,
step, rank), so a resumed run replays exactly. run.py builds what a step reads; rl.py and
sft.py are the steps; this file is the flags, their checks, and the loop.
"""
import argparse
import math
import os
import sys
import tempfile

import torch
import torch.distributed as dist
from tqdm import tqdm

import answers
import clipo
import critic
import countdown
import grpo
import rewards
import rl
import sft
from checkpoint import (LOGGERS, Mirror, append_metrics, check_model_dir, latest_checkpoint, load_state, missing_logger,
                        read_args, record_args, truncate_metrics)
from distributed import StopRequest, all_reduce, cpu_threads, launch, processes, seed_for
from eval import evaluate, wilson
from run import DEFAULT_CRITIC, DEFAULT_MODEL, SCRATCH, build_run, save
METRICS = {  # what each line of metrics.jsonl holds; the reward terms add theirs (metric_docs)
    "step": "optimizer steps done", "lr": "learning rate of the step",
    "loss": "training loss (SFT: cross-entropy per token; RL: clipped surrogate + KL)",
    "reward_mean": "mean total reward of the rollouts", "success_rate": "fraction of rollouts that verify",
    "format_rate": "fraction of rollouts with a parsable <Solution> block",
    "guess_rate": "fraction of rollouts with a <Solution> block after a search that never hit the target",
    "adv_std": "std of the advantages", "zero_adv_frac": "fraction of groups whose rewards are all equal (no signal)",
    "sampled_zero_adv_frac": "the same among all sampled groups, before --oversample chose",
    "sample_rounds": "rounds of rollouts the step drew (--max-sample-rounds; mean over processes)",
    "truncated_frac": "fraction of rollouts cut by the token budget (--mask-truncated takes them out of the loss)",
    "sampler_logp_gap": "mean |sampler log-prob - trainer's old log-prob| over response tokens (bf16 rollouts, "
                        "top-k/top-p; --tis-cap corrects for it)",
    "kl": "approx. KL(old || new) over the updates", "kl_ref": "k3 KL to the reference (with --kl-coef)",
    "clip_frac": "fraction of tokens whose ratio was clipped",
    "clipo_warmup": "CLIPO's head warm-up step of a step-0 row (the policy is not updated; --clipo-warmup)",
    "entropy": "mean token entropy of the sampling distribution (at --temperature) over the rollouts",
    "response_length_mean": "mean rollout length (tokens)", "response_length_max": "longest rollout (tokens)",
    "tokens_per_s": "sampled tokens per second (all ranks)",
    "time_sample": "seconds sampling", "time_reward": "seconds scoring (decode, verify, the mode's reward terms)",
    "time_train": "seconds in forward/backward passes (the old-log-prob pass and the updates)",
    "time_update": "of those, seconds in the updates (RL); every time_* waits for the device first",
    "heldout/success_rate": "greedy success on held-out problems (every --eval-every steps)",
    "heldout/success_low": "its 95% Wilson interval, lower end", "heldout/success_high": "and upper end",
    **{f"search/{key}": f"per rollout: {meaning}" for key, meaning in answers.SEARCH_COUNTS.items()},
    "search/solved_with_errors": "fraction of rollouts that verify with a process error in their search",
    **{f"heldout/{key}": f"per held-out answer: {meaning}" for key, meaning in answers.SEARCH_COUNTS.items()},
    "heldout/solved_with_errors": "fraction of held-out answers that verify with a process error in their search",
    **{f"heldout/failed_{kind.replace(' ', '_')}": f"fraction of held-out answers that failed: {kind} (answers.failure)"
       for kind in answers.FAILURES[1:]},
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


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", default="grpo", help=f"one of {', '.join(modes())}; RL modes combine, e.g. clipo+critic")
    ap.add_argument("--model", help=f"model directory or hub name (RL default: {DEFAULT_MODEL}; SFT: a new tiny model)")
    ap.add_argument("--out", help="run directory (default runs/<mode>)")
    ap.add_argument("--resume", action="store_true", help="continue the run in --out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, help="optimizer steps (default: 1500 SFT, 250 RL)")
    ap.add_argument("--lr", type=float, help="peak learning rate (default: 3e-3 SFT, 1e-4 RL)")
    ap.add_argument("--warmup", type=int, default=20, help="linear warm-up steps, then cosine to 10%%")
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--prompt", choices=("bare", "longproc"), help="prompt style (default: bare for the tiny model)")
    ap.add_argument("--preset", choices=sorted(countdown.PRESETS), default="tiny",
                    help="problem distribution (countdown.PRESETS): tiny, or longproc (LongProc 0.5k)")
    ap.add_argument("--eval-every", type=int, help="steps between held-out evaluations (default: 250 SFT, 25 RL)")
    ap.add_argument("--eval-problems", type=int, default=1000, help="held-out problems (greedy) per evaluation")
    ap.add_argument("--save-every", type=int, default=50)
    ap.add_argument("--keep", type=int, default=2, help="checkpoints kept (the newest)")
    ap.add_argument("--log", action="append", choices=LOGGERS, default=[],
                    help="also send every metric to tensorboard or wandb (optional packages; repeat for both)")
    ap.add_argument("--log-rollouts-every", type=int,
                    help="steps between groups of rollouts written to rollouts.jsonl (default: --eval-every)")
    # SFT
    ap.add_argument("--batch-size", type=int, default=32, help="SFT sequences per step (global)")
    ap.add_argument("--skip", type=float, default=0.1,
                    help="each written move of a demonstration is passed over with this probability, blind to the "
                         "target (countdown.search_trace); 0: the reference search, every move")
    ap.add_argument("--cut", type=int, help="demonstrations are cut at this many tokens (default: 2x the RL budget)")
    # RL
    ap.add_argument("--prompts-per-step", type=int, default=16, help="global; must divide by the world size")
    ap.add_argument("--group-size", type=int, default=8, help="rollouts per prompt (G)")
    ap.add_argument("--max-new-tokens", type=int)
    ap.add_argument("--temperature", type=float, default=1.0,
                    help="sampling temperature; the trainer's log-probs are of the same tempered distribution")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (the trainer does not filter)")
    ap.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens; 0: all")
    ap.add_argument("--oversample", type=float, default=0.0,
                    help="draw this fraction more prompts and train on the groups with signal first (DAPO)")
    ap.add_argument("--max-sample-rounds", type=int, default=4,
                    help="draw and roll out more prompts, up to this many rounds, until the step has its groups "
                         "with signal (DAPO's dynamic sampling; 1: one draw; docs/testbed.md: why 4)")
    ap.add_argument("--mask-truncated", action="store_true",
                    help="rollouts cut by the token budget add no loss (their rewards still count in the group)")
    ap.add_argument("--entropy-coef", type=float, default=0.0, help="entropy bonus weight in the loss")
    ap.add_argument("--tis-cap", type=float, default=0.0,
                    help="truncated importance weights min(pi_old / pi_sampler, C) on the loss; 0: off")
    ap.add_argument("--normalise-terms", action="store_true",
                    help="normalise the outcome and each reward term within the group apart, then add them")
    ap.add_argument("--ppo-epochs", type=int, default=1)
    ap.add_argument("--minibatches", type=int, default=2)
    ap.add_argument("--micro-batch", type=int, default=16, help="rows per forward (sorted by length)")
    ap.add_argument("--no-shared-prompt", action="store_true",
                    help="run each rollout's prompt in its own row (default: once per group, where exact)")
    ap.add_argument("--clip-low", type=float, default=0.2)
    ap.add_argument("--clip-high", type=float, default=0.28)
    ap.add_argument("--ratio", choices=grpo.RATIOS, default="token")
    ap.add_argument("--agg", choices=grpo.AGGREGATIONS, default="seq-mean-token-mean",
                    help="how token losses add up (docs/testbed.md: seq-mean-token-mean measured +2.7 points over token-mean)")
    ap.add_argument("--no-scale-adv", action="store_true", help="mean-centre advantages only (Dr. GRPO)")
    ap.add_argument("--kl-coef", type=float, default=0.0)
    ap.add_argument("--format-reward", type=float, default=0.0,
                    help="added when a <Solution> block parses; 0: RL learned to stop searching and guess for it")
    # critic / oracle
    ap.add_argument("--critic", default=DEFAULT_CRITIC, help="critic weights (trained first when absent); 'scratch': untrained (with --critic-online)")
    ap.add_argument("--critic-online", action="store_true",
                    help="the critic also trains during RL, on hindsight rows of the rollouts (no oracle)")
    ap.add_argument("--critic-credit", choices=rewards.CREDITS, default="sequence",
                    help="how state values become rewards (rewards.state_credit)")
    ap.add_argument("--critic-coef", type=float, default=0.5,
                    help="beta: weight of the state values (sequence) or of the step advantages (process)")
    # CLIPO
    ap.add_argument("--clipo-kind", choices=clipo.KINDS, default="infonce")
    ap.add_argument("--clipo-tau", type=float, default=0.05)
    ap.add_argument("--clipo-lambda", type=float, default=0.2)
    ap.add_argument("--clipo-floor", type=float, default=-0.5)
    ap.add_argument("--clipo-dim", type=int, default=512)
    ap.add_argument("--clipo-lr", type=float, default=1e-3)
    ap.add_argument("--clipo-warmup", type=int,
                    help="steps that train only the head, before the policy's --steps (default: --steps / 10, as "
                         "the paper's epoch of 1/10 to 1/6 of training)")
    # hardware
    ap.add_argument("--bf16", action="store_true",
                    help="bf16 autocast for training forwards (fp32 master weights), rollouts from a bf16 copy")
    ap.add_argument("--grad-checkpointing", action="store_true",
                    help="recompute each decoder layer in backward instead of keeping its activations")
    ap.add_argument("--fsdp", action="store_true", help="shard weights, gradients and AdamW state (FSDP2)")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the training forward (rollouts on a GPU replay CUDA graphs without it)")
    ap.add_argument("--procs", type=int, help="processes on this machine when not under torchrun "
                    "(default: one per core on CPU, where 2 x 1 thread beat 1 x 2 threads; 1 on GPU)")
    args = ap.parse_args(argv)
    sft = args.mode == "sft"
    args.out = args.out or (DEFAULT_MODEL if sft else os.path.join("runs", args.mode.replace("+", "-")))
    args.steps = args.steps or (1500 if sft else 250)
    args.lr = args.lr or (3e-3 if sft else 1e-4)
    args.eval_every = args.eval_every or (250 if sft else 25)
    args.log_rollouts_every = args.log_rollouts_every or args.eval_every
    if args.clipo_warmup is None:
        args.clipo_warmup = max(1, args.steps // 10) if "clipo" in args.mode.split("+") else 0
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
        if args.temperature <= 0:
            problems.append(f"--temperature {args.temperature}: RL samples; greedy rollouts of a group would be equal")
        if args.max_sample_rounds < 1:
            problems.append(f"--max-sample-rounds {args.max_sample_rounds}: at least one round of rollouts")
        if args.tis_cap < 0 or args.top_k < 0 or not 0 < args.top_p <= 1:
            problems.append("--tis-cap and --top-k must be >= 0, --top-p in (0, 1]")
        if args.prompts_per_step % world:
            problems.append(f"--prompts-per-step {args.prompts_per_step} does not divide by the {world} processes")
        elif (args.prompts_per_step // world) % args.minibatches:
            problems.append(f"{args.prompts_per_step // world} prompts per process do not split into "
                            f"--minibatches {args.minibatches}")
        if args.ratio == "geometric" and parts & {"critic", "oracle"} and args.critic_credit not in ("sequence", "prune"):
            problems.append(f"--ratio geometric (GMPO) needs one advantage per sequence, but --critic-credit "
                            f"{args.critic_credit} gives per-token advantages: use sequence credit or another --ratio")
    elif args.batch_size % world:
        problems.append(f"--batch-size {args.batch_size} does not divide by the {world} processes")
    if not 0 <= args.skip < 1:
        problems.append(f"--skip {args.skip}: a probability in [0, 1) (1 would write no move at all)")
    if args.cut is not None and args.cut < 1:
        problems.append(f"--cut {args.cut}: demonstrations need at least one token")
    if args.fsdp and world < 2:
        problems.append("--fsdp shards over processes: run under torchrun, or with --procs 2 or more")
    if args.keep < 1:
        problems.append(f"--keep {args.keep}: keep at least the newest checkpoint")
    if missing_logger(args.log):
        problems.append(missing_logger(args.log))
    if args.resume and latest_checkpoint(args.out, say=lambda *a, **k: None) is None:
        problems.append(f"--resume: no intact checkpoint in {args.out}")
    if not args.resume and os.path.exists(os.path.join(args.out, "metrics.jsonl")):
        problems.append(f"{args.out} holds another run: pass --resume to continue it, or choose another --out")
    if args.resume:
        problems += resume_mismatches(args)
    if args.model and args.model != DEFAULT_MODEL:
        try:
            check_model_dir(args.model)
        except ValueError as e:
            problems.append(str(e))
    if args.normalise_terms and "clipo" in parts:
        problems.append("--normalise-terms with clipo: CLIPO's bonus acts through its spread among a group's "
                        "correct responses; normalised apart it becomes a second outcome-sized signal: drop one")
    if args.clipo_warmup < 0:
        problems.append(f"--clipo-warmup {args.clipo_warmup}: a number of steps, 0 or more")
    if args.critic_online and "critic" not in parts:
        problems.append("--critic-online trains the critic of mode critic: add critic to --mode")
    if args.critic == SCRATCH and not args.critic_online:
        problems.append("--critic scratch is an untrained critic: it needs --critic-online")
    if "critic" in parts and args.critic != SCRATCH and (args.critic != DEFAULT_CRITIC or os.path.exists(args.critic)):
        try:  # a missing default critic is trained first; any other must be a critic file
            critic.check_file(args.critic)
        except ValueError as e:
            problems.append(f"--critic: {e}")
    try:  # before any process starts: an unwritable --out fails here, not in a spawned worker
        os.makedirs(args.out, exist_ok=True)
        tempfile.TemporaryFile(dir=args.out).close()
    except OSError as e:
        problems.append(f"--out {args.out}: cannot write there ({e.strerror or e})")
    if problems:
        sys.exit("error: " + problems[0])


# flags a resumed run may change (recorded in args_history.jsonl); every other flag defines the run
RESUMABLE_CHANGES = {"steps", "eval_every", "eval_problems", "save_every", "keep", "procs", "micro_batch", "compile",
                     "grad_checkpointing", "fsdp", "no_shared_prompt", "out", "resume", "log", "log_rollouts_every"}


def resume_mismatches(args):
    """A resumed run must be the same run: each flag that defines it (mode, model, seed, sizes,
    reward and CLIPO settings, preset, prompt...) as args.json recorded it. Unset flags (None)
    take the recorded value."""
    saved = read_args(args.out) or {}
    for key, value in vars(args).items():
        if key in RESUMABLE_CHANGES or value is None or key not in saved or saved[key] == value:
            continue
        return [f"--resume: --{key.replace('_', '-')} {value} differs from the run's {saved[key]} "
                f"(flags that define a run must match; steps, cadences and logging may change)"]
    return []


def learning_rate(args, step):
    warm = min(1.0, (step + 1) / max(1, args.warmup))
    progress = min(1.0, step / max(1, args.steps))
    return args.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# ---------------------------------------------------------------------------------------------
# The loop

def heldout_success(run, heldout, step):
    """Greedy success on the held-out problems with its 95% Wilson interval, sampled like the
    rollouts (same model copy and precision); every process evaluates its share. Rank 0 also
    appends which problems were solved to heldout.jsonl (for paired comparisons of runs)."""
    share = list(range(run.rank, len(heldout), run.world))
    run.refresh_rollout_model()
    metrics = evaluate(run.rollout_model, run.tokenizer, [heldout[i] for i in share], style=run.style,
                       max_new_tokens=run.max_new_tokens, eos_token_id=run.eos)
    solved = [0.0] * len(heldout)
    for i, s in zip(share, metrics["solved"]):
        solved[i] = s
    solved = all_reduce(solved, run.world)
    if run.rank == 0:
        append_metrics(run.args.out, {"step": step, "solved": "".join(str(int(s)) for s in solved)}, "heldout.jsonl")
        shown = [{"nums": list(heldout[i].nums), "target": heldout[i].target, "text": text, "failure": kind}
                 for i, text, kind in zip(share, metrics["texts"], metrics["failure_kinds"])][:HELDOUT_SHOWN]
        append_metrics(run.args.out, {"step": step, "kind": "heldout", "answers": shown}, "rollouts.jsonl")
    low, high = wilson(sum(solved), len(solved))
    n = len(heldout)  # every process's answers: the counts add up over processes
    share_sums = {**{key: metrics["search"][key] * len(share) for key in answers.SEARCH_COUNTS},
                  "solved_with_errors": metrics["solved_with_errors"] * len(share),
                  **{f"failed_{kind.replace(' ', '_')}": metrics["failures"][kind] * len(share)
                     for kind in answers.FAILURES[1:]}}
    totals = all_reduce(share_sums, run.world)
    return {"heldout/success_rate": sum(solved) / len(solved), "heldout/success_low": low, "heldout/success_high": high,
            **{f"heldout/{key}": value / n for key, value in totals.items()}}


HELDOUT_SHOWN = 8  # greedy held-out answers written to rollouts.jsonl per evaluation


def warm_start_ready():
    found = latest_checkpoint(DEFAULT_MODEL, say=lambda *a, **k: None)
    return found is not None and load_state(found)["finished"]


def clipo_warmup(run, args, rank, log):
    """CLIPO's head trains alone on --clipo-warmup steps of rollouts before the policy's first
    step (steps -W..-1: rl_step updates no policy and adds no bonus there), logged as step 0 rows
    with "clipo_warmup"; then a checkpoint at step 0, so a resume never repeats it. A stop asked
    for during the warm-up is honoured once it is done."""
    for k in tqdm(range(args.clipo_warmup), desc="clipo warm-up", disable=rank != 0):
        warm_step = k - args.clipo_warmup
        torch.manual_seed(seed_for(args.seed, "torch", warm_step, rank))
        row = {"step": 0, "clipo_warmup": k + 1, **rl.rl_step(run, warm_step)}
        if rank == 0:
            log(row)
    save(run, 0, finished=False)


def train(args, rank, world, device):
    """Build the run, then its steps from where it stands; True when stopped (Ctrl-C, SIGTERM)."""
    cpu_threads(device)
    run, start = build_run(args, rank, world, device)
    heldout = countdown.heldout_problems(args.eval_problems, args.preset)
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        truncate_metrics(args.out, start)
        record_args(args.out, vars(args), start)
    step_fn = sft.sft_step if args.mode == "sft" else rl.rl_step
    mirror = Mirror(args.log, args.out, start, vars(args)) if rank == 0 and args.log else None

    def log(row):
        append_metrics(args.out, row)
        if mirror:
            mirror.log(row)
    if start == 0 and args.mode != "sft":  # where RL starts from: step 0 of the curves
        row = {"step": 0, **heldout_success(run, heldout, 0)}
        if rank == 0:
            log(row)
    if start == 0 and not args.resume and "clipo" in run.terms and args.clipo_warmup:
        clipo_warmup(run, args, rank, log)
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc=args.mode, disable=rank != 0)
    step, stopping = start, False
    with StopRequest() as stop:  # Ctrl-C / SIGTERM: finish the step, save, stop
        for step in bar:
            lr = learning_rate(args, step)
            for group in run.optimizer.param_groups:
                group["lr"] = lr
            torch.manual_seed(seed_for(args.seed, "torch", step, rank))
            row = {"step": step + 1, "lr": lr, **step_fn(run, step)}
            done = step + 1 == args.steps
            if (step + 1) % args.eval_every == 0 or done:
                row.update(heldout_success(run, heldout, step + 1))
            stopping = stop.agreed(world)  # every rank stops after the same step, or none does
            if rank == 0:
                log(row)
                if run.rollouts is not None and (step + 1) % args.log_rollouts_every == 0:
                    append_metrics(args.out, rl.readable_group(run, run.rollouts, step + 1), "rollouts.jsonl")
                bar.set_postfix({k: round(row[k], 3) for k in ("loss", "reward_mean", "success_rate",
                                                              "heldout/success_rate") if k in row})
            if (step + 1) % args.save_every == 0 or done or stopping:
                save(run, step + 1, finished=done)
            if stopping:
                break
    bar.close()
    if mirror:
        mirror.close()
    if world > 1:
        dist.barrier()  # the checkpoint is written before any rank reads it (RL after the warm start)
    if rank == 0:
        print(f"{args.mode}: {step + 1} steps, latest checkpoint in {args.out}")
    return stopping


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    procs = args.procs or (1 if torch.cuda.is_available() else os.cpu_count() or 1)
    if "RANK" not in os.environ and procs > 1:
        check_args(args, procs)
        return launch(main, argv, procs)
    with processes() as (rank, world, device):
        check_args(args, world)
        if args.mode != "sft" and not args.model and not warm_start_ready():
            if rank == 0:
                print(f"no warm start in {DEFAULT_MODEL}: training it first (python train.py --mode sft)")
            sft_args = parse_args(["--mode", "sft", "--seed", str(args.seed)])
            sft_args.resume = latest_checkpoint(sft_args.out, say=lambda *a, **k: None) is not None
            check_args(sft_args, world)
            if train(sft_args, rank, world, device):
                return
        train(args, rank, world, device)


if __name__ == "__main__":
    main()

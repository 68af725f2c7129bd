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
metrics.docs()) and `args.json`. Ctrl-C or SIGTERM finishes the current step on every rank,
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
import grpo
import problems as problem_source
import rewards
import rl
import sft
import terms  # noqa: F401  (registers the built-in reward terms: their modes and flags)
from checkpoint import (LOGGERS, Mirror, append_metrics, check_model_dir, current_args, latest_checkpoint, load_state,
                        missing_logger, read_args, record_args, truncate_metrics)
from distributed import StopRequest, all_reduce, cpu_threads, launch, processes, seed_for
from eval import evaluate, wilson
from metrics import readable_group
from run import DEFAULT_MODEL, build_run, save


def modes():
    """Valid --mode parts: sft alone, or grpo and the reward terms, joined by "+"."""
    return ("sft", "grpo", *rewards.REWARD_TERMS)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help shows every flag's default: its value, or in words in the help (a default set by mode)."""

    def _get_help_string(self, action):
        if action.default in (None, argparse.SUPPRESS) or "default" in action.help:
            return action.help
        return action.help + " (default: %(default)s)"


def parser():
    """train.py's flags, in groups: the run, SFT, RL, each reward term's (rewards.flag_groups), hardware."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter,
                                 epilog="Every metric a run logs, and what it means: python metrics.py")
    run = ap.add_argument_group("run")
    run.add_argument("--mode", default="grpo", help=f"one of {', '.join(modes())}; RL modes combine, e.g. clipo+critic")
    run.add_argument("--model", help=f"model directory or hub name (default: RL {DEFAULT_MODEL}; SFT a new tiny model)")
    run.add_argument("--out", help=f"run directory (default: runs/<mode>; SFT {DEFAULT_MODEL})")
    run.add_argument("--resume", action="store_true", help="continue the run in --out")
    run.add_argument("--seed", type=int, default=0, help="every random draw is a function of (seed, step, rank)")
    run.add_argument("--steps", type=int, help="optimizer steps (default: 2500 SFT, 250 RL)")
    run.add_argument("--lr", type=float, help="peak learning rate (default: 3e-3 SFT, 1e-4 RL)")
    run.add_argument("--warmup", type=int, default=20, help="linear warm-up steps, then cosine to 10%%")
    run.add_argument("--grad-clip", type=float, default=1.0, help="gradients are clipped to this global norm")
    run.add_argument("--prompt", choices=("bare", "longproc"),
                     help="prompt style (default: bare for the tiny model, longproc for a chat model)")
    run.add_argument("--preset", choices=sorted(problem_source.PRESETS), default="tiny",
                     help="problem distribution (problems.PRESETS): tiny, or longproc (LongProc 0.5k)")
    run.add_argument("--data", help="train on the problems of this file (LongProc JSON or our JSONL; problems.py) "
                                    "(default: the preset's stream)")
    run.add_argument("--heldout", type=int, help="keep this many of --data's problems out of training: the held-out "
                                                 "evaluations read them (default: none; the preset's held-out set)")
    run.add_argument("--eval-every", type=int, help="steps between held-out evaluations (default: 500 SFT, 25 RL)")
    run.add_argument("--eval-problems", type=int, default=1000, help="held-out problems (greedy) per evaluation")
    run.add_argument("--save-every", type=int, default=50, help="steps between checkpoints")
    run.add_argument("--keep", type=int, default=2, help="checkpoints kept (the newest)")
    run.add_argument("--log", action="append", choices=LOGGERS, default=[],
                     help="also send every metric to tensorboard or wandb (optional packages; repeat for both)")
    run.add_argument("--log-rollouts-every", type=int,
                     help="steps between groups of rollouts written to rollouts.jsonl (default: --eval-every)")
    sft_flags = ap.add_argument_group("SFT")
    sft_flags.add_argument("--batch-size", type=int, default=16,
                           help="sequences per step (global; 16: the learning transition comes after about as many "
                                "steps as at 32, each half the cost: docs/testbed.md#the-warm-start)")
    sft_flags.add_argument("--skip", type=float, default=0.1,
                           help="each written move of a demonstration is passed over with this probability, blind "
                                "to the target (countdown.search_trace); 0: the reference search, every move")
    sft_flags.add_argument("--cut", type=int, help="demonstrations are cut at this many tokens (default: 2x the RL "
                                                   "budget, --max-new-tokens)")
    rl_flags = ap.add_argument_group("RL (docs/grpo.md: their TRL / verl names)")
    rl_flags.add_argument("--prompts-per-step", type=int, default=16, help="global; must divide by the world size")
    rl_flags.add_argument("--group-size", type=int, default=8, help="rollouts per prompt (G)")
    rl_flags.add_argument("--max-new-tokens", type=int,
                          help="rollout and evaluation budget (default: 160 bare prompts, 1024 longproc)")
    rl_flags.add_argument("--temperature", type=float, default=1.0,
                          help="sampling temperature; the trainer's log-probs are of the same tempered distribution")
    rl_flags.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (the trainer does not filter)")
    rl_flags.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens; 0: all")
    rl_flags.add_argument("--oversample", type=float, default=0.0,
                          help="draw this fraction more prompts and train on the groups with signal first (DAPO)")
    rl_flags.add_argument("--max-sample-rounds", type=int, default=4,
                          help="draw and roll out more prompts, up to this many rounds, until the step has its "
                               "groups with signal (DAPO's dynamic sampling; 1: one draw)")
    rl_flags.add_argument("--mask-truncated", action="store_true",
                          help="rollouts cut by the token budget add no loss (their rewards still count in the group)")
    rl_flags.add_argument("--entropy-coef", type=float, default=0.0, help="entropy bonus weight in the loss")
    rl_flags.add_argument("--tis-cap", type=float, default=0.0,
                          help="truncated importance weights min(pi_old / pi_sampler, C) on the loss; 0: off")
    rl_flags.add_argument("--normalise-terms", action="store_true",
                          help="normalise the outcome and each reward term within the group apart, then add them")
    rl_flags.add_argument("--ppo-epochs", type=int, default=1, help="passes of updates over each step's rollouts")
    rl_flags.add_argument("--minibatches", type=int, default=2, help="optimizer steps per pass (groups split evenly)")
    rl_flags.add_argument("--micro-batch", type=int, default=16, help="rows per forward (sorted by length)")
    rl_flags.add_argument("--no-shared-prompt", action="store_true",
                          help="run each rollout's prompt in its own row (default: once per group, where exact)")
    rl_flags.add_argument("--clip-low", type=float, default=0.2, help="the ratio is clipped below at 1 - this")
    rl_flags.add_argument("--clip-high", type=float, default=0.28, help="and above at 1 + this (DAPO's clip-higher)")
    rl_flags.add_argument("--ratio", choices=grpo.RATIOS, default="token",
                          help="token (GRPO), sequence (GSPO) or geometric (GMPO) importance ratio (grpo.Loss)")
    rl_flags.add_argument("--agg", choices=grpo.AGGREGATIONS, default="seq-mean-token-mean",
                          help="how token losses add up (grpo.Loss)")
    rl_flags.add_argument("--no-scale-adv", action="store_true", help="mean-centre advantages only (Dr. GRPO)")
    rl_flags.add_argument("--kl-coef", type=float, default=0.0, help="k3 KL to the frozen starting model; 0: none")
    rl_flags.add_argument("--format-reward", type=float, default=0.0, help="added when a <Solution> block parses")
    for title, flags in rewards.flag_groups():
        group = ap.add_argument_group(title)
        for flag, options in flags:
            group.add_argument(flag, **options)
    hardware = ap.add_argument_group("hardware")
    hardware.add_argument("--bf16", action="store_true",
                          help="bf16 autocast for training forwards (fp32 master weights), rollouts from a bf16 copy")
    hardware.add_argument("--grad-checkpointing", action="store_true",
                          help="recompute each decoder layer in backward instead of keeping its activations")
    hardware.add_argument("--fsdp", action="store_true", help="shard weights, gradients and AdamW state (FSDP2)")
    hardware.add_argument("--compile", action="store_true",
                          help="torch.compile the training forward (rollouts on a GPU replay CUDA graphs without it)")
    hardware.add_argument("--procs", type=int, help="processes on this machine when not under torchrun "
                                                    "(default: one per core on CPU, 1 on GPU)")
    return ap


def parse_args(argv=None):
    """The flags, completed: the defaults a mode sets (SFT or RL), then each reward term's."""
    args = parser().parse_args(argv)
    sft = args.mode == "sft"
    args.out = args.out or (DEFAULT_MODEL if sft else os.path.join("runs", args.mode.replace("+", "-")))
    if args.resume:  # a flag not given takes the run's value, before any default follows another flag
        for key, value in (current_args(args.out) or {}).items():  # (--clipo-warmup follows --steps)
            if getattr(args, key, False) is None:
                setattr(args, key, value)
    args.steps = args.steps or (2500 if sft else 250)
    args.lr = args.lr or (3e-3 if sft else 1e-4)
    args.eval_every = args.eval_every or (500 if sft else 25)
    args.log_rollouts_every = args.log_rollouts_every or args.eval_every
    parts = args.mode.split("+")
    for name, term in rewards.REWARD_TERMS.items():
        term.complete(args, name in parts)
    return args


def check_args(args, world):
    """Every error a user can make, as one line, before any model is loaded."""
    problems = []
    parts = set(args.mode.split("+"))
    if not parts <= set(modes()) or ("sft" in parts and len(parts) > 1):
        problems.append(f"unknown --mode {args.mode!r}: expected one of {', '.join(modes())} (RL modes joined by +)")
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
    for name, term in rewards.REWARD_TERMS.items():
        problems += term.check(args, name in parts)
    problems += problem_source.check(args)
    try:  # before any process starts: an unwritable --out fails here, not in a spawned worker
        if not problems:  # (a refused run leaves no directory behind)
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


def warm_up_terms(run, args, rank, log, steps):
    """Reward terms that train before the policy (CLIPO's head, --clipo-warmup) get `steps` steps
    of rollouts first, numbered -W..-1 (rl_step updates no policy and adds no bonus there), logged
    as step 0 rows with "warmup_step"."""
    for k in tqdm(range(steps), desc="warm-up", disable=rank != 0):
        torch.manual_seed(seed_for(args.seed, "torch", k - steps, rank))
        row = {"step": 0, "warmup_step": k + 1, **rl.rl_step(run, k - steps)}
        if rank == 0:
            log(row)


def train(args, rank, world, device):
    """Build the run, then its steps from where it stands; True when stopped (Ctrl-C, SIGTERM).
    A stop from the first moment on is honoured: one asked for while the run is built, during
    the step-0 evaluation or a reward term's warm-up is honoured once those are done, with a
    checkpoint at step 0 (a resume from it repeats none of them); in the loop, after the step."""
    cpu_threads(device)
    with StopRequest() as stop:  # Ctrl-C / SIGTERM: finish the step (or what comes before step 1), save, stop
        run, start = build_run(args, rank, world, device)
        heldout = run.problems.heldout
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
        stopping = False
        if start == 0 and not args.resume:  # a resume at step 0 has a checkpoint: what comes first is done
            if args.mode != "sft":  # where RL starts from: step 0 of the curves
                row = {"step": 0, **heldout_success(run, heldout, 0)}
                if rank == 0:
                    log(row)
            warmup = max((term.warmup_steps(args) for term in run.terms.values()), default=0)
            if warmup:
                warm_up_terms(run, args, rank, log, warmup)
            stopping = stop.agreed(world)
            if warmup or stopping:  # so a resume never repeats the warm-up (nor the step-0 evaluation)
                save(run, 0, finished=False)
        bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc=args.mode,
                   disable=rank != 0 or stopping)
        step = start - 1
        for step in bar if not stopping else ():
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
                    append_metrics(args.out, readable_group(run, run.rollouts, step + 1), "rollouts.jsonl")
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
        print(f"{args.mode}: {step + 1} steps, latest checkpoint in {args.out}"
              + (" (stopped: the same command with --resume continues it)" if stopping else ""))
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

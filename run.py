"""What a training run is made of: the typed `Run` every step reads, and how flags build it.

    run, start = build_run(args, rank, world, device)   # train.py does this once, then loops
    rl.rl_step(run, step)                               # sft.sft_step, rl.rl_step and the reward terms read it
    save(run, step, finished)                           # a checkpoint (collective under --fsdp)

The policy is a transformers causal LM with fp32 master weights. Training forwards go through
forward.TokenLogProbs, wrapped by DDP (several processes), or sharded with FSDP2 (`--fsdp`: each
decoder layer and the root, bf16 compute with --bf16, fp32 sharded weights and AdamW state).
Rollouts and evaluation sample from `rollout_model`: the policy itself, or a full copy (bf16
with --bf16; always under --fsdp, whose policy is sharded) refreshed before each rollout phase.
Imports: checkpoint, distributed, eval, forward, model, problems, rewards, torch.
"""
import argparse
import copy
import inspect
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel

import forward
import rewards
from checkpoint import check_model_dir, latest_checkpoint, load_state, save_checkpoint
from distributed import full_state, load_optimizer_state, shard
from eval import default_max_new_tokens, default_style
from model import TinyTokenizer, decoder_layers, eos_token_ids, load_model, load_tokenizer, new_tiny_model
from problems import training_problems

DEFAULT_MODEL = os.path.join("runs", "tiny-sft")  # the warm start's run directory


@dataclass
class Run:
    """Everything a training step reads, built once by build_run (the fields as CleanRL
    documents its Args). sft.sft_step, rl.rl_step and the reward terms receive it."""
    args: argparse.Namespace
    """the flags (train.parse_args), completed: defaults filled in, --prompt chosen"""
    rank: int
    """this process's rank (0 when alone)"""
    world: int
    """how many processes train together"""
    device: torch.device
    """where the model lives"""
    tokenizer: object
    """ours (model.TinyTokenizer) or a transformers tokenizer"""
    model: torch.nn.Module
    """the policy (a transformers causal LM, fp32 master weights; sharded under --fsdp): trained and saved"""
    train_model: torch.nn.Module
    """forward.TokenLogProbs of the policy as training forwards see it (DDP-wrapped, FSDP-sharded or compiled)"""
    rollout_model: torch.nn.Module
    """what samples and evaluates: the policy itself, or a full copy refreshed from it before each
    rollout phase (bf16 with --bf16, so the KV cache is bf16 and no autocast re-casts it)"""
    optimizer: torch.optim.Optimizer
    """AdamW over the policy's weights"""
    terms: dict
    """the mode's reward terms, name -> its rewards.RewardTerm, built with the run"""
    style: str
    """prompt style: "bare" (the tiny model) or "longproc" (chat models)"""
    max_new_tokens: int
    """rollout and evaluation budget"""
    eos: list
    """token ids that end a response (the tokenizer's and the model's generation config's)"""
    problems: object
    """where training problems come from and which the held-out evaluations read (problems.Problems)"""
    bf16: bool
    """--bf16: bf16 autocast in training forwards (CPU and CUDA), bf16 rollouts"""
    shared_prompt_rows: int = None
    """G when training forwards run each group's prompt once (forward.can_share_prompts), else None"""
    ref_model: torch.nn.Module = None
    """frozen reference for the KL term (only with --kl-coef > 0)"""
    rollouts: object = None
    """the last RL step's rl.Rollouts on this process (train.py logs a group of it to rollouts.jsonl)"""

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    @contextmanager
    def training(self):
        """Train mode for training passes (activation checkpointing acts only then; dropout is
        0 in these models), eval mode otherwise."""
        self.model.train()
        try:
            yield
        finally:
            self.model.eval()

    @torch.no_grad()
    def refresh_rollout_model(self):
        """Copy the policy's current weights into the rollout copy (no-op without one); under
        FSDP each weight is gathered once here, not at every decode step."""
        if self.rollout_model is not self.model:
            for mine, copy_ in zip(self.model.parameters(), self.rollout_model.parameters()):
                copy_.copy_(mine.full_tensor() if hasattr(mine, "full_tensor") else mine)


def ddp(module):
    """DDP that does not broadcast buffers before every forward: ours (rotary frequencies) are
    the same on every rank. A torch that has forward_sync_buffers (2.13, CI's) says so with
    forward_sync_buffers=False (it still syncs them once at init, harmless here) and warns on
    broadcast_buffers; an older one knows only broadcast_buffers=False."""
    flag = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            else "broadcast_buffers")
    return DistributedDataParallel(module, **{flag: False})


def build_run(args, rank, world, device):
    """The Run of these flags, and the step it starts at (> 0 when resuming)."""
    resume = latest_checkpoint(args.out) if args.resume else None
    source = resume or (check_model_dir(args.model or DEFAULT_MODEL) if args.model or args.mode != "sft" else None)
    tokenizer = load_tokenizer(source) if source else TinyTokenizer()
    model = load_model(source, device=device) if source else new_tiny_model(seed=args.seed).to(device)
    model.eval()  # sampling and evaluation; Run.training() switches for training passes
    args.prompt = args.prompt or default_style(tokenizer)
    if args.grad_checkpointing:
        model.activation_checkpointing_enable()
    rollout_model = model
    if args.bf16 or args.fsdp:
        rollout_model = copy.deepcopy(model).requires_grad_(False)
        if args.bf16:  # parameters only: buffers such as rotary frequencies stay fp32
            for p in rollout_model.parameters():
                p.data = p.data.to(torch.bfloat16)
    policy = forward.TokenLogProbs(model)
    if args.fsdp:
        shard(policy, decoder_layers(model), bf16=args.bf16)
        train_model = policy
    elif world > 1:
        train_model = ddp(policy)
    else:
        train_model = policy
    if args.compile:
        train_model = torch.compile(train_model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    run = Run(args=args, rank=rank, world=world, device=device, tokenizer=tokenizer, model=model,
              train_model=train_model, rollout_model=rollout_model, optimizer=optimizer, terms={},
              style=args.prompt, max_new_tokens=args.max_new_tokens or default_max_new_tokens(args.prompt),
              eos=eos_token_ids(model, tokenizer), problems=training_problems(args, write_to=args.out if rank == 0 else None), bf16=args.bf16,
              shared_prompt_rows=None if args.no_shared_prompt or not forward.can_share_prompts(model)
              else args.group_size)
    if args.kl_coef > 0 and args.mode != "sft":  # the frozen reference exists only when it is used
        run.ref_model = load_model(check_model_dir(args.model or DEFAULT_MODEL), device=device,
                                   dtype=torch.bfloat16 if args.bf16 else torch.float32).eval().requires_grad_(False)
    run.terms = {name: rewards.REWARD_TERMS[name](run) for name in rewards.mode_terms(args.mode)}
    if resume is None:
        return run, 0
    state = load_state(resume)  # on the CPU; the optimizer's tensors move to their parameters' devices
    load_optimizer_state(model, optimizer, state["optimizer"], world)
    for name, term in kept_terms(run).items():
        if name in state["modules"]:
            term.load_state_dict(state["modules"][name])
    return run, state["step"]


def kept_terms(run):
    """The reward terms with state (a state_dict), saved in and restored from checkpoints."""
    return {name: term for name, term in run.terms.items() if hasattr(term, "state_dict")}


def save(run, step, finished):
    """A checkpoint of this step. Every rank calls it: under FSDP the full weights and optimizer
    state are gathered to rank 0 (one format for every setup: from_pretrained loads the
    weights, and a run resumes on any number of processes), which writes them."""
    weights, optimizer = full_state(run.model, run.optimizer, sharded=run.args.fsdp)
    if run.rank == 0:
        save_checkpoint(run.args.out, run.model, run.tokenizer, step, optimizer_state=optimizer, model_state=weights,
                        finished=finished, modules={name: t.state_dict() for name, t in kept_terms(run).items()},
                        keep=run.args.keep)

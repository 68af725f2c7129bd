"""What a training run is made of: the typed `Run` every step reads, and how flags build it.

    run, start = build_run(args, rank, world, device)   # train.py does this once, then loops
    rl.rl_step(run, step)                               # sft.sft_step, rl.rl_step and the reward terms read it
    save(run, step, finished)                           # a checkpoint (collective under --fsdp)

The policy is a transformers causal LM with fp32 master weights. Training forwards go through
grpo.TokenLogProbs, wrapped by DDP (several processes), or sharded with FSDP2 (`--fsdp`: each
decoder layer and the root, bf16 compute with --bf16, fp32 sharded weights and AdamW state).
Rollouts and evaluation sample from `rollout_model`: the policy itself, or a full copy (bf16
with --bf16; always under --fsdp, whose policy is sharded) refreshed before each rollout phase.
Imports: checkpoint, clipo, countdown, critic, distributed, eval, grpo, model, rewards, torch.
"""
import argparse
import copy
import inspect
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import clipo
import countdown
import critic
import grpo
import rewards
from checkpoint import check_model_dir, latest_checkpoint, load_state, save_checkpoint
from distributed import full_state, load_optimizer_state, seed_for, shard
from eval import default_max_new_tokens, default_style
from model import TinyTokenizer, decoder_layers, eos_token_ids, load_model, load_tokenizer, new_tiny_model

DEFAULT_MODEL = os.path.join("runs", "tiny-sft")  # the warm start's run directory
DEFAULT_CRITIC = os.path.join("runs", "critic.safetensors")
SCRATCH = "scratch"  # --critic scratch: an untrained critic (with --critic-online)


def mode_terms(mode):
    """The reward terms a mode adds, in registry order: "clipo+critic" -> ("critic", "clipo")."""
    parts = set(mode.split("+"))
    return tuple(name for name in rewards.REWARD_TERMS if name in parts)


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
    """grpo.TokenLogProbs of the policy as training forwards see it (DDP-wrapped, FSDP-sharded or compiled)"""
    rollout_model: torch.nn.Module
    """what samples and evaluates: the policy itself, or a full copy refreshed from it before each
    rollout phase (bf16 with --bf16, so the KV cache is bf16 and no autocast re-casts it)"""
    optimizer: torch.optim.Optimizer
    """AdamW over the policy's weights"""
    terms: tuple
    """the reward terms of the mode (rewards.REWARD_TERMS keys), e.g. ("critic", "clipo")"""
    style: str
    """prompt style: "bare" (the tiny model) or "longproc" (chat models)"""
    max_new_tokens: int
    """rollout and evaluation budget"""
    eos: list
    """token ids that end a response (the tokenizer's and the model's generation config's)"""
    exclude: frozenset
    """problem keys training never draws (held-out stream, LongProc's test split)"""
    bf16: bool
    """--bf16: bf16 autocast in training forwards (CPU and CUDA), bf16 rollouts"""
    groups: int = None
    """G when training forwards run each group's prompt once (grpo.can_share_prompts), else None"""
    ref_model: torch.nn.Module = None
    """frozen reference for the KL term (only with --kl-coef > 0)"""
    critic: "critic.Critic" = None
    """the contrastive critic (mode "critic")"""
    critic_trainer: "critic.OnlineTrainer" = None
    """trains the critic on the rollouts (--critic-online)"""
    clipo: "clipo.ClipoModule" = None
    """CLIPO's head and its optimizer (mode "clipo")"""
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
            dist.barrier()
    return critic.load(args.critic, args.preset)  # tiny, and it scores text on the host: it stays on the CPU


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
    policy = grpo.TokenLogProbs(model)
    if args.fsdp:
        shard(policy, decoder_layers(model), bf16=args.bf16)
        train_model = policy
    elif world > 1:
        train_model = ddp(policy)
    else:
        train_model = policy
    if args.compile:
        train_model = torch.compile(train_model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    terms = mode_terms(args.mode)
    run = Run(args=args, rank=rank, world=world, device=device, tokenizer=tokenizer, model=model,
              train_model=train_model, rollout_model=rollout_model, optimizer=optimizer, terms=terms,
              style=args.prompt, max_new_tokens=args.max_new_tokens or default_max_new_tokens(args.prompt),
              eos=eos_token_ids(model, tokenizer), exclude=countdown.never_train_on(args.preset), bf16=args.bf16,
              groups=None if args.no_shared_prompt or not grpo.can_share_prompts(model) else args.group_size)
    if args.kl_coef > 0 and args.mode != "sft":  # the frozen reference exists only when it is used
        run.ref_model = load_model(check_model_dir(args.model or DEFAULT_MODEL), device=device,
                                   dtype=torch.bfloat16 if args.bf16 else torch.float32).eval().requires_grad_(False)
    if "critic" in terms:
        run.critic = load_critic(args, rank, world)
        if args.critic_online:
            run.critic_trainer = critic.OnlineTrainer(run.critic, args.preset)
    if "clipo" in terms:
        torch.manual_seed(seed_for(args.seed, "clipo-init"))
        run.clipo = clipo.ClipoModule(model.config.get_text_config().hidden_size, dim=args.clipo_dim,
                                      kind=args.clipo_kind, temperature=args.clipo_tau, lam=args.clipo_lambda,
                                      floor=args.clipo_floor, lr=args.clipo_lr, device=device)
    if resume is None:
        return run, 0
    state = load_state(resume)  # on the CPU; the optimizer's tensors move to their parameters' devices
    load_optimizer_state(model, optimizer, state["optimizer"], world)
    for name, module in trained_modules(run).items():
        if name in state["modules"]:
            module.load_state_dict(state["modules"][name])
    return run, state["step"]


def trained_modules(run):
    """The run's trained parts besides the policy, saved in and restored from checkpoints."""
    modules = (("critic", run.critic), ("critic_online", run.critic_trainer), ("clipo", run.clipo))
    return {name: module for name, module in modules if module is not None}


def save(run, step, finished):
    """A checkpoint of this step. Every rank calls it: under FSDP the full weights and optimizer
    state are gathered to rank 0 (one format for every setup: from_pretrained loads the
    weights, and a run resumes on any number of processes), which writes them."""
    weights, optimizer = full_state(run.model, run.optimizer, sharded=run.args.fsdp)
    if run.rank == 0:
        save_checkpoint(run.args.out, run.model, run.tokenizer, step, optimizer_state=optimizer, model_state=weights,
                        finished=finished, modules={name: m.state_dict() for name, m in trained_modules(run).items()},
                        keep=run.args.keep)

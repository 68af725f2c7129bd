"""Run directories: checkpoints a run resumes from (crash-safe), its metrics log and its flags.

    runs/grpo/checkpoints/step-000250/   a save_pretrained directory (weights, config, tokenizer) that
                                         AutoModelForCausalLM.from_pretrained loads, plus trainer_state.pt
                                         (step, optimizer, the run's other trained modules) to resume
    runs/grpo/latest                     the name of the newest complete checkpoint (one line)
    runs/grpo/metrics.jsonl              one JSON line per step (metrics.docs() names every key)
    runs/grpo/heldout.jsonl              per evaluation, which held-out problems were solved ("0110...")
    runs/grpo/rollouts.jsonl             what the policy wrote: a group of rollouts every --log-rollouts-every
                                         steps, a few greedy held-out answers per evaluation (eval.py --show)
    runs/grpo/tensorboard/               with --log tensorboard: every metrics.jsonl key as a scalar
    runs/grpo/wandb_id                   with --log wandb: the W&B run a --resume continues
    runs/grpo/args.json                  the flags the run started with (never rewritten)
    runs/grpo/args_history.jsonl         flags changed on a --resume (e.g. --steps), from which step

    python eval.py --model runs/grpo      # a run directory stands for its latest checkpoint

A save writes `step-N.tmp/`, renames it to `step-N/`, then moves `latest` atomically (a temp
file renamed over it), then deletes all but the newest `keep` checkpoints. A crash at any point
leaves `latest` naming a complete checkpoint; a checkpoint that is damaged anyway (a truncated
file) is skipped on resume for the newest intact one, and the user is told.
Imports: model (saving), torch, safetensors.
"""
import importlib.util
import json
import os
import re
import shutil
import sys

import torch
from safetensors import SafetensorError, safe_open

from model import check_model_path, save_model

LATEST, FOLDER = "latest", "checkpoints"
STEP_DIR = re.compile(r"step-(\d+)$")


def checkpoint_dir(run_dir, step):
    return os.path.join(run_dir, FOLDER, f"step-{step:06d}")


def save_checkpoint(run_dir, model, tokenizer, step, *, optimizer_state, model_state=None, finished=False,
                    modules=None, keep=2):
    """Write step `step`'s checkpoint, point `latest` at it, keep the newest `keep`.
    `model_state`: the full weights when `model` holds a shard; `modules`: state dicts of the
    run's other trained parts (critic, CLIPO head), by name."""
    final = checkpoint_dir(run_dir, step)
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # a save that crashed before
    save_model(model, tokenizer, tmp, state_dict=model_state)
    torch.save({"step": step, "finished": finished, "optimizer": optimizer_state, "modules": modules or {}},
               os.path.join(tmp, "trainer_state.pt"))
    if os.path.exists(final):  # left by a crashed run that never pointed `latest` at it
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = os.path.join(run_dir, LATEST)
    with open(pointer + ".tmp", "w") as f:
        f.write(os.path.relpath(final, run_dir) + "\n")
    os.replace(pointer + ".tmp", pointer)
    for old in _step_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for name in os.listdir(os.path.dirname(final)):  # halves of saves that crashed
        if name.endswith(".tmp"):
            shutil.rmtree(os.path.join(os.path.dirname(final), name), ignore_errors=True)


def _step_dirs(run_dir):
    """Complete checkpoint directories of a run, oldest first."""
    folder = os.path.join(run_dir, FOLDER)
    names = [n for n in (os.listdir(folder) if os.path.isdir(folder) else []) if STEP_DIR.match(n)]
    return [os.path.join(folder, n) for n in sorted(names, key=lambda n: int(STEP_DIR.match(n)[1]))]


def damage(checkpoint, resumable=True):
    """Why a checkpoint directory cannot be loaded (one line), or None when it looks intact.
    resumable=False: a model directory is enough (no trainer_state.pt needed)."""
    for name in ("config.json", "trainer_state.pt")[:2 if resumable else 1]:
        if not os.path.isfile(os.path.join(checkpoint, name)):
            return f"{name} is missing"
    weights = [n for n in os.listdir(checkpoint) if n.endswith(".safetensors")]
    if not weights:
        return "no .safetensors weights"
    for name in weights:
        path = os.path.join(checkpoint, name)
        try:
            expected = _safetensors_end(path)
            if os.path.getsize(path) < expected:
                return f"{name} is truncated ({os.path.getsize(path):,} of {expected:,} bytes)"
            with safe_open(path, "pt") as f:
                f.keys()
        except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
            return f"{name} is unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    return None


def _safetensors_end(path):
    """The file size a safetensors file's header promises: 8 + header + the last tensor's end."""
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    return 8 + header_len + max(ends, default=0)


def is_run_dir(path):
    return os.path.isfile(os.path.join(path, LATEST)) or os.path.isdir(os.path.join(path, FOLDER))


def latest_checkpoint(run_dir, say=print):
    """The checkpoint to resume from: the one `latest` names if intact, else the newest intact
    one (saying why); None when there is none."""
    named = None
    if os.path.isfile(os.path.join(run_dir, LATEST)):
        with open(os.path.join(run_dir, LATEST)) as f:
            named = os.path.normpath(os.path.join(run_dir, f.read().strip()))
    candidates = ([named] if named else []) + [d for d in reversed(_step_dirs(run_dir)) if d != named]
    for path in candidates:
        problem = damage(path) if os.path.isdir(path) else "it does not exist"
        if problem is None:
            return path
        say(f"checkpoint {path}: {problem}; trying the previous one", file=sys.stderr)
    return None


def resolve_model_path(path):
    """A run directory stands for its latest intact checkpoint; anything else is returned as is."""
    if os.path.isdir(path) and is_run_dir(path):
        found = latest_checkpoint(path, say=lambda *a, **k: None)
        if found is None:
            raise ValueError(f"{path} is a run directory without an intact checkpoint")
        return found
    return path


def load_state(checkpoint):
    """trainer_state.pt of a checkpoint: step, finished, optimizer, modules. Loaded to the CPU:
    every rank reads the file, and saved CUDA tensors would otherwise all land on one GPU."""
    return torch.load(os.path.join(checkpoint, "trainer_state.pt"), map_location="cpu", weights_only=True)


def append_metrics(run_dir, row, name="metrics.jsonl"):
    with open(os.path.join(run_dir, name), "a") as f:
        f.write(json.dumps(row) + "\n")


def truncate_metrics(run_dir, step, say=print):
    """On resume: drop the lines a stopped run wrote after its last checkpoint (metrics.jsonl,
    heldout.jsonl, rollouts.jsonl), and a partial last line (a kill during a write)."""
    for name in ("metrics.jsonl", "heldout.jsonl", "rollouts.jsonl"):
        path = os.path.join(run_dir, name)
        if not os.path.exists(path):
            continue
        with open(path) as f:
            lines = [line for line in f if line.strip()]
        rows = []
        for k, line in enumerate(lines):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                if k < len(lines) - 1:
                    raise ValueError(f"{path}: line {k + 1} is not JSON (only a partial last line is repaired)")
                say(f"{path}: dropped a partial last line (the run was killed while writing it)", file=sys.stderr)
                continue
            if row["step"] <= step:
                rows.append(json.dumps(row) + "\n")
        with open(path, "w") as f:
            f.writelines(rows)


LOGGERS = ("tensorboard", "wandb")  # --log choices; each is the package it needs


def missing_logger(names):
    """One line for the first --log whose package is not installed (checked before any model
    loads), or None."""
    for name in names:
        if importlib.util.find_spec(name) is None:
            return f"--log {name} needs the {name} package: pip install {name}"
    return None


class Mirror:
    """metrics.jsonl stays the source of truth; each of its rows is also sent, key by key, to
    TensorBoard (run_dir/tensorboard) and/or Weights & Biases (rank 0 only). A resumed run
    continues the same logger run: TensorBoard purges the events past the checkpoint's step,
    W&B resumes the run id kept in run_dir/wandb_id (offline: WANDB_MODE=offline)."""

    def __init__(self, names, run_dir, start, config):
        self.tensorboard = self.wandb = None
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter
            self.tensorboard = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=start + 1)
        if "wandb" in names:
            import wandb
            id_file = os.path.join(run_dir, "wandb_id")
            if not os.path.exists(id_file):
                with open(id_file, "w") as f:
                    f.write(wandb.util.generate_id() + "\n")
            with open(id_file) as f:
                run_id = f.read().strip()
            self.wandb = wandb.init(project="countdown-rl", name=os.path.basename(os.path.abspath(run_dir)),
                                    id=run_id, resume="allow", dir=run_dir, config=config)

    def log(self, row):
        scalars = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        if self.tensorboard:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, row["step"])
            self.tensorboard.flush()
        if self.wandb:
            self.wandb.log(scalars, step=row["step"])

    def close(self):
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb:
            self.wandb.finish()


def read_args(run_dir):
    """The flags a run started with (args.json), or None."""
    path = os.path.join(run_dir, "args.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def current_args(run_dir):
    """The flags a run has now: args.json with every change args_history.jsonl recorded, or None."""
    current = read_args(run_dir)
    history = os.path.join(run_dir, "args_history.jsonl")
    if current is not None and os.path.exists(history):
        with open(history) as f:
            for line in f:
                if line.strip():
                    current.update(json.loads(line)["changed"])
    return current


def record_args(run_dir, flags, step):
    """A new run writes args.json; a resumed one leaves it as it is and appends the flags that
    changed since (e.g. --steps) to args_history.jsonl, with the step they apply from."""
    current = current_args(run_dir)
    if current is None:
        with open(os.path.join(run_dir, "args.json"), "w") as f:
            json.dump(flags, f, indent=1)
        return
    history = os.path.join(run_dir, "args_history.jsonl")
    changed = {k: v for k, v in flags.items() if k != "resume" and current.get(k) != v}
    if changed:
        with open(history, "a") as f:
            f.write(json.dumps({"from_step": step, "changed": changed}) + "\n")


def check_model_dir(path):
    """A model path ready to load, or a one-line ValueError: a run directory becomes its latest
    intact checkpoint, a local directory must hold readable weights (a hub name is left to
    transformers)."""
    path = resolve_model_path(path)
    check_model_path(path)
    if os.path.isdir(path):
        problem = damage(path, resumable=False)
        if problem:
            raise ValueError(f"{path}: {problem}")
    return path

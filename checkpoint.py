"""Run directories: the checkpoint a run resumes from, its metrics log and its flags.

    runs/grpo/model/              a save_pretrained directory (weights, config, tokenizer) that
                                  AutoModelForCausalLM.from_pretrained loads, plus trainer_state.pt
                                  (step, optimizer, the run's other trained modules) to resume
    runs/grpo/metrics.jsonl       one JSON line per step (train.metric_docs() names every key)
    runs/grpo/args.json           the flags of the run

train.py calls these; nothing here knows about modes or models beyond save_pretrained.
Imports: model (saving), torch.
"""
import json
import os
import shutil

import torch

from model import save_model


def save_checkpoint(run_dir, model, tokenizer, optimizer, step, finished=False, modules=None):
    """Atomically replace run_dir/model: write a temp dir, then rename over the old one.
    `modules`: state dicts of the run's other trained parts (critic, CLIPO head), by name."""
    final, tmp = os.path.join(run_dir, "model"), os.path.join(run_dir, "model.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tokenizer, tmp)
    torch.save({"step": step, "finished": finished, "optimizer": optimizer.state_dict(), "modules": modules or {}},
               os.path.join(tmp, "trainer_state.pt"))
    if os.path.exists(final):
        os.replace(final, final + ".old")
    os.replace(tmp, final)
    shutil.rmtree(final + ".old", ignore_errors=True)


def load_state(run_dir):
    """trainer_state.pt of the run's checkpoint: step, finished, optimizer, modules."""
    return torch.load(os.path.join(run_dir, "model", "trainer_state.pt"), weights_only=True)


def append_metrics(run_dir, row):
    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


def truncate_metrics(run_dir, step):
    """On resume: drop the lines a stopped run wrote after its last checkpoint."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            rows = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        with open(path, "w") as f:
            f.writelines(rows)


def write_args(run_dir, args):
    with open(os.path.join(run_dir, "args.json"), "w") as f:
        json.dump(vars(args), f, indent=1)

"""One RL step under --fsdp, then each rank writes the bytes of its parameter and optimizer
shards next to the unsharded totals (tests/test_fsdp.py, bench/torchrun_exits.py):

    torchrun --nproc_per_node=2 tests/fsdp_bytes.py --fsdp --mode grpo --model DIR --out OUT ...
    -> OUT/bytes-<rank>.txt: "local params, all params, local optimizer state, all optimizer state"
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pseudo_outcome  # noqa: E402  (first: it puts the project on sys.path)
import countdown  # noqa: E402
import rl  # noqa: E402
import train  # noqa: E402
from distributed import processes  # noqa: E402
from run import build_run  # noqa: E402

countdown.verify = pseudo_outcome.verify


def local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def nbytes(tensors):
    return sum(local(t).numel() * t.element_size() for t in tensors), sum(t.numel() * t.element_size() for t in tensors)


if __name__ == "__main__":
    with processes() as (rank, world, device):
        args = train.parse_args(sys.argv[1:])
        run, _ = build_run(args, rank, world, device)
        rl.rl_step(run, 0)
        states = [v for s in run.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"bytes-{rank}.txt"), "w") as f:  # one file per rank: torchrun interleaves stdout
            f.write(" ".join(map(str, (*nbytes(list(run.model.parameters())), *nbytes(states)))))

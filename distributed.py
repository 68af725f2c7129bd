"""Processes: torchrun or our own launcher, collectives, threads per phase, seeds.

    torchrun --nproc_per_node=8 train.py ...   # NCCL on GPUs
    python train.py ...                         # on CPU: one process per core (gloo), via launch()

Everything also runs as a single process (world = 1): then no process group exists and the
collectives below return their input.
Imports: torch.
"""
import os
import signal
import socket

import torch
import torch.distributed as dist


def setup_distributed():
    """(rank, world, device). Single process when not launched by torchrun."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    return rank, world, device


def cpu_threads(world):
    """Share the cores among the processes. Measured on our 2-core VMs (bench/threads.py), the
    tiny model's training step runs 1.7-1.9x faster on 2 threads than on 1, its decode step
    1.05-1.4x: no phase loses from more threads, so every phase uses the process's share.
    Two processes x 1 thread (launch()) beat one x 2 on rollouts: their decodes run side by side."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))


def seed_for(*parts):
    """A 63-bit seed that depends on every part (stable across runs and machines)."""
    h = 1469598103934665603
    for p in parts:
        for byte in str(p).encode() + b"|":
            h = ((h ^ byte) * 1099511628211) % (1 << 64)
    return h >> 1


def all_reduce(values, world, op="sum"):
    """Sum (or max) floats over processes, in one collective: a list, or a dict reduced by name
    (every process must hold the same keys in the same order)."""
    if isinstance(values, dict):
        return dict(zip(values, all_reduce(list(values.values()), world, op)))
    if world == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()


def _worker(local_rank, entry, argv, procs, port):
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(procs),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    entry(argv)


def launch(entry, argv, procs):
    """Run entry(argv) in `procs` processes on this machine, with the environment torchrun sets."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the workers, which save and exit
    torch.multiprocessing.spawn(_worker, args=(entry, argv, procs, port), nprocs=procs, join=True)

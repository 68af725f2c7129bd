"""Processes: torchrun or our own launcher, collectives, sharding (FSDP2), stopping together,
threads, seeds, a clock that waits for the device.

    torchrun --nproc_per_node=8 train.py ...   # NCCL on GPUs
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv-endpoint=HOST:29500 train.py ...
    python train.py ...                         # on CPU: one process per core (gloo), via launch()

Everything also runs as a single process (world = 1): then no process group exists and the
collectives below return their input.

    with processes() as (rank, world, device):   # every launched process's body: ends cleanly

    shard(policy, layers, bf16)            # FSDP2: each decoder layer, then the root
    with gradient_sync(train_model, last): # accumulate micro-batches, reduce on the last
    weights, optim = full_state(model, optimizer, sharded)   # for a checkpoint (collective)
Imports: torch.
"""
import os
import signal
import socket
import sys
import gc
import time

from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


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


@contextmanager
def processes():
    """(rank, world, device) for the body of a process, torchrun's or ours. When the body ends
    normally, every rank waits at a barrier (nothing collective is left in flight), then the
    process group is destroyed, which joins gloo's worker threads. Why: a process that exits with
    the group alive aborts now and then ("terminate called without an active exception"; 5 of 30
    launches of a 2-rank script that all-reduces, bench/torchrun_exits.py): a worker thread drops
    its last reference to a finished collective's tensors after the interpreter began to finalise,
    asks for the GIL to free them and is ended inside a C++ destructor. gc.collect() first frees
    the DDP/FSDP objects that still hold the group through reference cycles. An exception leaves
    at once: a barrier could wait forever for a rank that is still computing."""
    rank, world, device = setup_distributed()
    yield rank, world, device
    if dist.is_initialized():
        dist.barrier()
        gc.collect()
        dist.destroy_process_group()


def cpu_threads(device):
    """Torch threads of this process on the CPU. The user's OMP_NUM_THREADS wins (torch reads it
    when it starts, and we leave it alone): two jobs sharing a machine must be able to say so (one
    SFT run that took all cores beside another job ran 10x slower). Otherwise this machine's
    cores are shared among its processes (LOCAL_WORLD_SIZE: a node's, not the whole job's).
    Measured on our 2-core VMs (bench/threads.py), the tiny model's training step runs 1.7-1.9x
    faster on 2 threads than on 1, its decode step 1.05-1.4x: no phase loses from more threads,
    so every phase uses the process's share. Two processes x 1 thread (launch()) beat one x 2
    on rollouts: their decodes run side by side. (torchrun sets OMP_NUM_THREADS=1 for its
    workers when it is unset: under torchrun, set it yourself for more.)"""
    if device.type == "cpu" and not os.environ.get("OMP_NUM_THREADS"):
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


def clock(device):
    """Seconds (perf_counter) once the work queued on `device` is done. CUDA runs kernels
    asynchronously: a clock read without waiting bills the GPU work to whatever waits next (a
    1.5B model's forward+backward over 84k tokens was once logged as 1.1 s). Every time_* metric
    and bench timer reads this clock; on the CPU it is perf_counter."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def shard(root, layers, bf16):
    """FSDP2: shard each decoder layer, then the root (embeddings, final norm, LM head). Weights
    and AdamW state stay fp32 and sharded; with bf16, forwards and backwards compute in bf16 and
    gradients are reduced in fp32."""
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    for layer in layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(root, mp_policy=policy)


def gradient_sync(model, enabled):
    """A context for one micro-batch's backward: under DDP, enabled=False keeps the gradients
    local (no_sync), so only the minibatch's last micro-batch all-reduces. FSDP2 reduce-scatters
    every micro-batch: its gradients then accumulate as fp32 shards (skipping the sync would keep
    whole bf16 gradients instead: more memory, less precision)."""
    if enabled or not hasattr(model, "no_sync"):  # DDP, compiled or not
        return nullcontext()
    return model.no_sync()


def full_state(model, optimizer, sharded):
    """(weights, optimizer state) for a checkpoint: weights None unless sharded (then gathered,
    like the optimizer state, to rank 0's CPU; other ranks get empty dicts). Every rank calls
    this. The optimizer state is keyed by parameter name, so it loads on any number of ranks."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options) if sharded else None
    return weights, get_optimizer_state_dict(model, optimizer, options=options)


def load_optimizer_state(model, optimizer, state, world):
    """The inverse of full_state's optimizer part, onto this rank's (possibly sharded) weights."""
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=world > 1)
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=options)


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


def all_gather_lists(items, world):
    """Every process's list, concatenated in rank order, on every process (small Python objects)."""
    if world == 1:
        return list(items)
    gathered = [None] * world
    dist.all_gather_object(gathered, items)
    return [x for part in gathered for x in part]


class StopRequest:
    """Ctrl-C or SIGTERM (what torchrun and schedulers send): finish the step, save, exit 0.
    A second signal more than a second later exits at once (torchrun forwards a Ctrl-C that the
    workers also got from the terminal: those two count as one)."""

    def __enter__(self):
        self.requested_at = None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *_):
        for sig, handler in self.previous.items():  # train.main called from Python leaves its caller's handlers
            signal.signal(sig, handler)

    def _handle(self, signum, _):
        if self.requested_at is not None:
            if time.monotonic() - self.requested_at > 1.0:
                raise KeyboardInterrupt
            return
        self.requested_at = time.monotonic()
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\n{name}: finishing this step, then saving (again to quit without saving)", file=sys.stderr)

    def agreed(self, world):
        """Whether any process was asked to stop: one tiny collective a step, so all ranks stop
        after the same step (one rank leaving alone would hang the others in a collective)."""
        return all_reduce([float(self.requested_at is not None)], world, "max")[0] > 0


def _worker(local_rank, entry, argv, procs, port):
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(procs),
                      LOCAL_WORLD_SIZE=str(procs), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    entry(argv)


def launch(entry, argv, procs):
    """Run entry(argv) in `procs` processes on this machine, with the environment torchrun sets.
    Ctrl-C reaches the workers from the terminal; a SIGTERM to this process is passed on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    context = torch.multiprocessing.spawn(_worker, args=(entry, argv, procs, port), nprocs=procs, join=False)

    def forward(signum, _):
        for process in context.processes:
            if process.is_alive():
                os.kill(process.pid, signum)
    signal.signal(signal.SIGTERM, forward)
    while not context.join():
        pass

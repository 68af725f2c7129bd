"""Do torchrun-launched processes exit cleanly? Launches each 2-rank script the tests launch N
times and counts non-zero exits (not in CI: ~25 minutes at N=30 on 2 cores).

    python bench/torchrun_exits.py                 # 30 launches of each script
    python bench/torchrun_exits.py --launches 5 --scripts bytes ddp

Scripts: `bytes` (tests/fsdp_bytes.py: one --fsdp step), `ddp` and `fsdp` (tests/pseudo_outcome.py:
train.py for 2 steps), `sigterm` (an --fsdp run stopped by SIGTERM after its first step, then
resumed: two launches, both counted; torchrun exits 1 on a SIGTERM by design, so the stopped launch
counts as clean when rank 0 printed its closing line and no rank aborted), and `bare`, the control: a script that all-reduces and exits
without distributed.processes(), the pattern that aborted ("terminate called without an active
exception"). Each launch gets OMP_NUM_THREADS=1, as in the tests.
"""
import argparse
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from model import TinyTokenizer, new_tiny_model, save_model  # noqa: E402

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
BARE = """
import torch, torch.distributed as dist
dist.init_process_group("gloo")
for _ in range(200):
    dist.all_reduce(torch.randn(1000))
"""


def flags(model, out, steps, *extra):
    return ["--mode", "grpo", "--model", str(model), "--out", str(out), "--steps", str(steps), "--prompts-per-step", "4",
            "--group-size", "4", "--max-new-tokens", "40", "--minibatches", "2", "--micro-batch", "4",
            "--eval-every", "2", "--eval-problems", "4", "--lr", "1e-3", "--seed", "3", *extra]


def launch(argv):
    """(exit code, the line that says why when non-zero)."""
    result = subprocess.run(TORCHRUN + argv, capture_output=True, text=True, timeout=600, env=ENV, cwd=ROOT)
    why = next((line for line in result.stderr.splitlines() if "terminate called" in line or "Error" in line), "")
    return result.returncode, why


def sigterm_then_resume(model, out):
    argv = TORCHRUN + [str(ROOT / "tests" / "pseudo_outcome.py")] + flags(model, out, 4, "--fsdp")
    proc = subprocess.Popen(argv, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    printed, err = proc.communicate(timeout=300)
    # torchrun itself exits 1 on SIGTERM whatever its workers do (it re-raises the signal as an
    # error): here a clean exit is rank 0's closing line and no abort
    aborted = next((line for line in err.splitlines() if "terminate called" in line), "")
    first = (0 if "latest checkpoint in" in printed and not aborted else 1, aborted or "no closing line")
    return [first, launch([str(ROOT / "tests" / "pseudo_outcome.py")] + flags(model, out, 4, "--fsdp", "--resume"))]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--launches", type=int, default=30)
    ap.add_argument("--scripts", nargs="+", default=["bytes", "ddp", "fsdp", "sigterm", "bare"])
    args = ap.parse_args()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="torchrun-exits-"))
    save_model(new_tiny_model(seed=0), TinyTokenizer(), str(tmp / "model"))
    (tmp / "bare.py").write_text(BARE)
    runner, model = str(ROOT / "tests" / "pseudo_outcome.py"), tmp / "model"
    scripts = {
        "bytes": lambda out: [launch([str(ROOT / "tests" / "fsdp_bytes.py")] + flags(model, out, 1, "--fsdp"))],
        "ddp": lambda out: [launch([runner] + flags(model, out, 2))],
        "fsdp": lambda out: [launch([runner] + flags(model, out, 2, "--fsdp"))],
        "sigterm": lambda out: sigterm_then_resume(model, out),
        "bare": lambda out: [launch([str(tmp / "bare.py")])],
    }
    print("| script | launches | non-zero exits | why (first seen) | seconds per launch |\n|---|---|---|---|---|")
    for name in args.scripts:
        codes, start = [], time.perf_counter()
        for i in range(args.launches):
            codes += scripts[name](tmp / f"{name}-{i}")
        failed = [(code, why) for code, why in codes if code != 0]
        why = failed[0][1][:60] if failed else ""
        print(f"| {name} | {len(codes)} | {len(failed)} | {why} | {(time.perf_counter() - start) / len(codes):.1f} |",
              flush=True)


if __name__ == "__main__":
    main()

"""Fill a plan of runs side by side, keep each finished run in results/, render the tables from them.

    python bench/runner.py run robust --jobs 2                 # this machine's CPU, one thread per run
    python bench/runner.py run robust --device cuda --jobs 10 --minutes 7 --archive $OUT/cells.tar.gz
    python bench/runner.py run robust --warm h200 --jobs 2     # RL here from warm starts an H200 trained
    python bench/runner.py run smoke --jobs 2                  # a plan of tiny cells: a dry run in ~2 minutes
    python bench/runner.py status robust                       # which cells are done, where
    python bench/runner.py render                              # rewrite every table in README.md and docs/
    python bench/runner.py render --check                      # exit 1 if a page differs from its render

A cell is one `train.py` run: a warm start per seed (`warm`, the default SFT), an RL run from a
warm start (mode and flags), or an SFT-alone baseline. Its run directory is
runs/cells/<place>/s<seed>/<cell>/ (resumed when it stopped, reused when it finished); once it
finishes, the cell's process evaluates the final model out of distribution (`tiny-wide`, as many
problems as the cell's held-out evaluation: 1,000, greedy) and writes
results/<place>/<cell>-s<seed>.json: the command and flags, commit, versions, machine, minutes and
how many runs shared the machine, the held-out curve, which held-out problems were solved at the
start and at the end (paired differences), the held-out search counts, the sampled rollouts' last
25 steps, and the OOD problems solved. <place> is `cpu` (a 2-core VM), the GPU's short name
(`h200`), or `cpu-warm-h200` (--warm: RL on this CPU from the warm starts an H200 trained, copied
back in its archive): runs on different hardware are different draws, never mixed in a row.

`run` skips cells whose record exists, starts the others in the plan's order once their warm start
has its record, `--jobs N` at a time (on CPU each gets one process and one thread: --jobs 1 keeps
train.py's defaults, whose minutes are the ones a user sees), and with `--minutes M` stops
launching a cell that would not finish by M (its time guessed from the finished cells of its kind)
and stops the running ones at M (SIGTERM: train.py saves, a later `run` resumes); a SIGTERM or
Ctrl-C to the runner stops its cells the same way (they run in sessions of their own, which a
terminal's Ctrl-C does not reach), and a cell killed before its first checkpoint starts afresh. `--archive`
packs the records, every cell's logs and every finished SFT cell's weights into one file to copy
back. `--store DIR` puts results/ and runs/cells/ under DIR (run experiments from a worktree of
a fixed commit, records into the project). Tables: results.py renders them; each table in a
page sits between `<!-- table NAME -->` and `<!-- /table -->`, and tests/test_results.py fails
when one differs from its render.
"""
import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.append(os.path.join(ROOT, "bench"))  # after the project: bench/countdown.py must not shadow countdown

STORE = ROOT  # results/ and runs/cells/ go under this folder (--store; the project's own by default)
OOD_PRESET = "tiny-wide"  # as many problems as the cell's held-out evaluation (1,000 by default)
SEEDS = (0, 1, 2)
CRITIC = "{critic}"  # in a cell's flags: the critic of its seed, beside its warm start (command())
# Cells: name -> (train.py flags beyond --seed/--model/--out). "warm" is every RL cell's start.
CELLS = {
    "warm": ["--mode", "sft"],
    "grpo-rounds1": ["--mode", "grpo", "--max-sample-rounds", "1"],  # the RL defaults before refilling (4) won
    "grpo-rounds4": ["--mode", "grpo", "--max-sample-rounds", "4"],
    "grpo-rounds4-mask": ["--mode", "grpo", "--max-sample-rounds", "4", "--mask-truncated"],
    "grpo-rounds4-g16": ["--mode", "grpo", "--max-sample-rounds", "4", "--group-size", "16", "--prompts-per-step", "8"],
    "grpo-rounds4-t12": ["--mode", "grpo", "--max-sample-rounds", "4", "--temperature", "1.2"],
    "grpo-rounds4-kl": ["--mode", "grpo", "--max-sample-rounds", "4", "--kl-coef", "0.02"],
    "grpo-rounds4-lr2": ["--mode", "grpo", "--max-sample-rounds", "4", "--lr", "2e-4"],
    "grpo-rounds4-500": ["--mode", "grpo", "--max-sample-rounds", "4", "--steps", "500", "--eval-every", "50"],
    "oracle-prune": ["--mode", "oracle", "--critic-credit", "prune", "--critic-coef", "0.3", "--max-sample-rounds", "1"],
    "oracle-prune-rounds4": ["--mode", "oracle", "--critic-credit", "prune", "--critic-coef", "0.3",
                             "--max-sample-rounds", "4"],
    "clipo-rounds4": ["--mode", "clipo", "--max-sample-rounds", "4"],
    # SFT alone for the pipeline's minutes: its own cosine schedule over all N steps, the noisy
    # demonstrator and the reference search (every move); N from a 2-core run's minutes (docs/testbed.md)
    "sft-alone-2964": ["--mode", "sft", "--steps", "2964", "--eval-every", "500"],
    "sft-every-2964": ["--mode", "sft", "--steps", "2964", "--eval-every", "500", "--skip", "0"],
    # SFT alone for the default pipeline's user minutes on 2 cores (12 + 27: 2,500 steps took 12.0)
    "sft-alone-8000": ["--mode", "sft", "--steps", "8000", "--eval-every", "1000"],
    # a warm start at the reference search's ceiling (1,500 steps leave 2 of 3 seeds on their learning
    # transition: docs/testbed.md), RL from it, and SFT alone for that pipeline's minutes
    # (3,000 + the 1,464 SFT steps GRPO's 250 steps cost on 2 cores)
    "warm3000": ["--mode", "sft", "--steps", "3000", "--eval-every", "500"],
    "grpo-rounds1-w3000": ["--mode", "grpo", "--max-sample-rounds", "1"],
    "grpo-rounds4-w3000": ["--mode", "grpo", "--max-sample-rounds", "4"],
    "sft-alone-4464": ["--mode", "sft", "--steps", "4464", "--eval-every", "500"],
    "sft-every-4464": ["--mode", "sft", "--steps", "4464", "--eval-every", "500", "--skip", "0"],
    # the credits table (docs/testbed.md#dense-credit-that-reaches-the-policy): per-token dead-end charges of
    # the oracle and of a critic trained per seed (CRITIC: runs/cells/<place>/s<seed>/critic.safetensors,
    # trained by the first cell that needs it), the critic online from scratch and from the offline one,
    # one sampling round (where a credit is the only signal of a flat group), CLIPO at 16 and 8 rollouts
    # (coefficients 1 and 2: a 25-step probe at 0.5 moved the advantages by 0.03-0.04 per token)
    "oracle-steps1": ["--mode", "oracle", "--critic-credit", "prune-steps", "--critic-coef", "1.0"],
    "oracle-steps2": ["--mode", "oracle", "--critic-credit", "prune-steps", "--critic-coef", "2.0"],
    "critic-steps1": ["--mode", "critic", "--critic-credit", "prune-steps", "--critic-coef", "1.0", "--critic", CRITIC],
    "critic-steps2": ["--mode", "critic", "--critic-credit", "prune-steps", "--critic-coef", "2.0", "--critic", CRITIC],
    "critic-online-scratch": ["--mode", "critic", "--critic-credit", "prune-steps", "--critic-coef", "2.0",
                              "--critic", "scratch", "--critic-online"],
    "critic-online": ["--mode", "critic", "--critic-credit", "prune-steps", "--critic-coef", "2.0", "--critic", CRITIC,
                      "--critic-online"],
    "oracle-steps2-rounds1": ["--mode", "oracle", "--critic-credit", "prune-steps", "--critic-coef", "2.0",
                              "--max-sample-rounds", "1"],
    "clipo-g16": ["--mode", "clipo", "--group-size", "16", "--prompts-per-step", "8"],
    # the dry run's cells: the pipeline's shape in ~2 minutes of 2 CPU cores
    "smoke-warm": ["--mode", "sft", "--steps", "30", "--eval-every", "30", "--eval-problems", "50"],
    "smoke-grpo": ["--mode", "grpo", "--steps", "3", "--eval-every", "3", "--eval-problems", "50",
                   "--prompts-per-step", "4"],
    "smoke-stop": ["--mode", "sft", "--steps", "100000", "--eval-every", "100000", "--eval-problems", "50"],  # --minutes ends it
}
WARM_OF = {"smoke-grpo": "smoke-warm", "grpo-rounds1-w3000": "warm3000", "grpo-rounds4-w3000": "warm3000"}  # an RL cell's warm start when it is not "warm"
PLANS = {  # cells in priority order, each for every seed of the plan
    "smoke": (["smoke-warm", "smoke-grpo"], (0, 1)),
    "robust": (["warm", "grpo-rounds4", "grpo-rounds1", "grpo-rounds4-mask", "sft-alone-2964", "sft-every-2964",
                "grpo-rounds4-g16", "grpo-rounds4-t12", "grpo-rounds4-kl", "grpo-rounds4-lr2", "oracle-prune-rounds4",
                "grpo-rounds4-500", "oracle-prune", "clipo-rounds4"], SEEDS),
    "warm3000": (["warm3000", "grpo-rounds1-w3000", "grpo-rounds4-w3000", "sft-alone-4464", "sft-every-4464"], SEEDS),
    "warm5": (["warm"], (0, 1, 2, 3, 4)),  # the SFT default (batch 16, 2,500 steps) on five seeds
    # the user's pipeline and SFT alone for its minutes: docs/testbed.md#the-users-pipeline-the-warm-start-then-grpo
    "pipeline": (["warm", "grpo-rounds4", "sft-alone-8000"], (0, 1, 2, 3, 4)),
    "credits": (["warm", "grpo-rounds4", "oracle-steps1", "oracle-steps2", "critic-steps1", "critic-steps2",
                 "critic-online-scratch", "critic-online", "grpo-rounds1", "oracle-steps2-rounds1", "grpo-rounds4-g16",
                 "clipo-g16", "clipo-rounds4"], SEEDS),
}


def place(device):
    """Where runs happen, as a folder name: `cpu`, or the GPU's short name (h200)."""
    if device == "cpu":
        return "cpu"
    import torch
    return torch.cuda.get_device_name().split()[-1].lower()


def record_path(where, cell, seed):
    return os.path.join(STORE, "results", where, f"{cell}-s{seed}.json")


def run_dir(where, cell, seed):
    return os.path.join(STORE, "runs", "cells", where, f"s{seed}", cell)


def is_rl(cell):
    return "--mode" in CELLS[cell] and CELLS[cell][CELLS[cell].index("--mode") + 1] != "sft"


def warm_place(where):
    """`cpu-warm-h200`: RL on this CPU from the warm starts an H200 trained (--warm h200)."""
    return where.partition("-warm-")[2] or where


def warm_model(where, cell, seed):
    """The final weights of an RL cell's warm start: the newest checkpoint folder of its run (an
    archive copied back holds the weights alone, without the optimizer state a resume needs)."""
    folder = os.path.join(run_dir(warm_place(where), WARM_OF.get(cell, "warm"), seed), "checkpoints")
    return os.path.join(folder, max(os.listdir(folder)))


def critic_path(where, seed):
    return os.path.join(STORE, "runs", "cells", warm_place(where), f"s{seed}", "critic.safetensors")


def command(where, cell, seed, alone):
    flags = [critic_path(where, seed) if flag == CRITIC else flag for flag in CELLS[cell]]
    flags += ["--seed", str(seed), "--out", run_dir(where, cell, seed)]
    if is_rl(cell):
        flags += ["--model", warm_model(where, cell, seed)]
    if not alone:
        flags += ["--procs", "1"]
    return [sys.executable, os.path.join(ROOT, "train.py"), *flags]


def read_jsonl(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def relative(value):
    """A path inside the store or the project as the project sees it (records travel between machines)."""
    for folder in (STORE, ROOT):
        if isinstance(value, str) and value.startswith(folder + os.sep):
            return os.path.relpath(value, folder)
    return value


def git(*args):
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def machine(device):
    import torch
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": torch.cuda.get_device_name() if device == "cuda" else None}


def write_record(where, cell, seed, device, cmd, seconds, beside):
    """The finished run's record (results/<where>/<cell>-s<seed>.json), OOD evaluation included."""
    import torch
    import transformers
    from checkpoint import check_model_dir, read_args
    from eval import evaluate
    from model import load_model, load_tokenizer
    from problems import heldout_problems
    out = run_dir(where, cell, seed)
    metrics = read_jsonl(os.path.join(out, "metrics.jsonl"))
    evals = [r for r in metrics if "heldout/success_rate" in r]
    solved = {r["step"]: r["solved"] for r in read_jsonl(os.path.join(out, "heldout.jsonl"))}
    first, last = evals[0]["step"], evals[-1]["step"]
    sampled = [r for r in metrics if "success_rate" in r][-25:]  # RL: the last 25 steps' rollouts
    path = check_model_dir(out)
    ood = evaluate(load_model(path, device=device), load_tokenizer(path),
                   heldout_problems(read_args(out)["eval_problems"], OOD_PRESET))
    record = {
        "cell": cell, "seed": seed, "place": where, "warm_cell": WARM_OF.get(cell, "warm") if is_rl(cell) else None, "command": [relative(c) for c in cmd[1:]],
        "flags": {k: relative(v) for k, v in read_args(out).items()},
        "commit": git("rev-parse", "HEAD") or os.environ.get("RUNNER_COMMIT", ""), "dirty": bool(git("status", "--porcelain", "--", "*.py")),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()},
        "machine": machine(device), "runs_beside": beside, "minutes": round(seconds / 60, 2), "steps": last,
        "curve": {str(r["step"]): r["heldout/success_rate"] for r in evals},
        "solved_start": solved[first], "solved_end": solved[last], "start_step": first,
        "heldout_start": {k[8:]: v for k, v in evals[0].items() if k.startswith("heldout/")},
        "heldout_end": {k[8:]: v for k, v in evals[-1].items() if k.startswith("heldout/")},
        "rollouts_last25": {k: sum(r[k] for r in sampled) / len(sampled) for k in sampled[-1]
                            if k not in ("step", "lr") and all(k in r for r in sampled)} if sampled else {},
        "ood": {"preset": OOD_PRESET, "solved": "".join(str(int(s)) for s in ood["solved"])},
    }
    if CRITIC in CELLS[cell] or "critic" in read_args(out)["mode"].split("+"):  # the critic's AUROC vs the oracle
        logged = {k.split("_")[-1]: v for k, v in evals[-1].items() if k.startswith("critic/auroc_")}  # online
        if not logged:
            import critic
            logged = {str(k): v for k, v in critic.evaluate(critic.load(critic_path(where, seed))).items()}
        record["critic_auroc"] = logged
    os.makedirs(os.path.dirname(record_path(where, cell, seed)), exist_ok=True)
    tmp = record_path(where, cell, seed) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, record_path(where, cell, seed))


def default_signals():
    """In the child, before train.py starts: SIGTERM and SIGINT as a new process has them (an
    ignored signal is inherited, and train.py's handlers come only once it builds the run)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def run_cell(args):
    """`runner.py cell`: one cell in a process of its own: train.py (resumed if it stopped), then,
    once it finished, the record (the OOD evaluation loads the model: the runner stays light).
    A SIGTERM reaches train.py (the same process group), which saves and stops; this waits for
    it and keeps the seconds it ran for the resumed run's total."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    out = run_dir(args.where, args.cell, args.seed)
    cmd = command(args.where, args.cell, args.seed, args.jobs == 1)
    before = 0.0
    if not os.path.exists(os.path.join(out, "latest")):  # never saved (killed hard before its first
        for name in os.listdir(out) if os.path.isdir(out) else []:  # checkpoint): nothing to resume, start afresh
            if name != "runner.log":
                path = os.path.join(out, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    else:
        cmd.append("--resume")
        if os.path.exists(os.path.join(out, "seconds.json")):  # absent: a run killed hard, or begun by hand
            with open(os.path.join(out, "seconds.json")) as f:
                before = json.load(f)["seconds"]
    began = time.time()
    if CRITIC in CELLS[args.cell] and not os.path.exists(critic_path(args.where, args.seed)):
        import critic  # the first cell of a seed that needs it trains the seed's critic (critic.py's 5 minutes)
        os.makedirs(os.path.dirname(critic_path(args.where, args.seed)), exist_ok=True)
        critic.save(critic.train(minutes=5.0, seed=args.seed, progress=False), critic_path(args.where, args.seed))
    code = subprocess.call(cmd, cwd=ROOT, preexec_fn=default_signals)  # train.py hears the stops this ignores
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "seconds.json"), "w") as f:
        json.dump({"seconds": before + time.time() - began}, f)
    if code or not finished(out):
        sys.exit(code or 3)
    write_record(args.where, args.cell, args.seed, args.device, cmd, before + time.time() - began, args.jobs)


def run_plan(args):
    cells, seeds = PLANS[args.plan]
    where = place(args.device) + (f"-warm-{args.warm}" if args.warm else "")
    todo = [(c, s) for c in cells for s in seeds if not os.path.exists(record_path(where, c, s))
            and (is_rl(c) or not args.warm)]
    env = {**os.environ, **({} if args.jobs == 1 else {"OMP_NUM_THREADS": "1"}),
           **({"CUDA_VISIBLE_DEVICES": ""} if args.device == "cpu" else {})}
    start, running, took = time.time(), {}, {}
    deadline = start + 60 * args.minutes if args.minutes else None
    print(f"{args.plan} on {where}: {len(todo)} of {len(cells) * len(seeds)} cells to run, {args.jobs} at a time",
          flush=True)

    def ready(cell, seed):
        return not is_rl(cell) or os.path.exists(record_path(warm_place(where), WARM_OF.get(cell, "warm"), seed))

    def fits(cell):  # the longest finished cell of its kind as the guess; none finished: try
        guess = max(took.get("rl" if is_rl(cell) else cell, [0.0]))
        return deadline is None or time.time() + guess < deadline - 15

    def say(text):
        print(f"{(time.time() - start) / 60:5.1f} min  {text}", flush=True)

    stopped, asked = False, []
    for sig in (signal.SIGTERM, signal.SIGINT):  # cells run in sessions of their own: a stop reaches them from here
        signal.signal(sig, lambda signum, frame: asked.append(signal.Signals(signum).name))
    while todo or running:
        for cell, seed in list(todo):
            if len(running) < args.jobs and not stopped and ready(cell, seed) and fits(cell):
                os.makedirs(run_dir(where, cell, seed), exist_ok=True)
                log = open(os.path.join(run_dir(where, cell, seed), "runner.log"), "a")
                proc = subprocess.Popen([sys.executable, __file__, "--store", STORE, "cell", where, cell, str(seed),
                                         "--device", args.device, "--jobs", str(args.jobs)], env=env, stdout=log,
                                        stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
                running[(cell, seed)] = [proc, time.time(), 0]
                todo.remove((cell, seed))
                say(f"start {cell} s{seed}")
        if not running and todo and (stopped or not any(ready(c, s) and fits(c) for c, s in todo)):
            break  # what is left cannot start: its warm start failed, or no time is left
        time.sleep(1)
        if not stopped and (asked or (deadline and time.time() > deadline)):
            stopped = True
            for proc, _, _ in running.values():
                os.killpg(proc.pid, signal.SIGTERM)  # train.py saves and exits: a later run resumes it
            say(f"{asked[0] if asked else f'--minutes {args.minutes} reached'}: stopping {len(running)} runs")
        for key, (proc, began, beside) in list(running.items()):
            running[key][2] = max(beside, len(running))
            if proc.poll() is None:
                continue
            del running[key]
            cell, seed = key
            if proc.returncode:
                say(f"stopped {cell} s{seed} (exit {proc.returncode}; "
                    f"{os.path.relpath(run_dir(where, cell, seed), ROOT)}/runner.log)")
                continue
            with open(record_path(where, cell, seed)) as f:
                record = json.load(f)
            record["runs_beside"] = max(beside, 1)  # the most cells that ran at once during this one
            with open(record_path(where, cell, seed), "w") as f:
                json.dump(record, f, indent=1)
            took.setdefault("rl" if is_rl(cell) else cell, []).append(time.time() - began)
            say(f"done {cell} s{seed}: {record['minutes']:.1f} min, up to {record['runs_beside']} runs at once")
    if todo:
        say(f"not run: {', '.join(f'{c} s{s}' for c, s in todo)}")
    if args.archive:
        pack(where, args.archive)


def finished(out):
    from checkpoint import latest_checkpoint, load_state
    found = latest_checkpoint(out, say=lambda *a, **k: None)
    return found is not None and load_state(found)["finished"]


LOGS = ("metrics.jsonl", "heldout.jsonl", "rollouts.jsonl", "args.json", "runner.log", "seconds.json")


def pack(where, archive):
    """One file to copy back: the records, every cell's logs (what the policy wrote included), and
    each finished SFT cell's final weights (what a later RL cell can start from)."""
    from checkpoint import check_model_dir
    with tarfile.open(archive, "w:gz") as tar:
        if os.path.isdir(os.path.join(STORE, "results", where)):
            tar.add(os.path.join(STORE, "results", where), arcname=os.path.join("results", where))
        cells = os.path.join(STORE, "runs", "cells", where)
        for seed_dir in sorted(os.listdir(cells)) if os.path.isdir(cells) else []:
            for cell in sorted(os.listdir(os.path.join(cells, seed_dir))):
                out = os.path.join(cells, seed_dir, cell)
                files = [os.path.join(out, name) for name in LOGS if os.path.exists(os.path.join(out, name))]
                if cell in CELLS and not is_rl(cell) and finished(out):  # any SFT cell can be a warm start
                    model = check_model_dir(out)
                    files += [os.path.join(model, name) for name in os.listdir(model) if name != "trainer_state.pt"]
                for path in files:
                    tar.add(path, arcname=os.path.relpath(path, STORE))
    print(f"wrote {archive} ({os.path.getsize(archive) / 1e6:.1f} MB)")


def status(args):
    cells, seeds = PLANS[args.plan]
    folder = os.path.join(STORE, "results")
    places = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    for where in places:
        print(f"{where}:")
        for cell in cells:
            done = [s for s in seeds if os.path.exists(record_path(where, cell, s))]
            print(f"  {cell:24s} {'seeds ' + ' '.join(map(str, done)) if done else '-'}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default=ROOT, help="the folder that holds results/ and runs/cells/ (default: the project)")
    sub = ap.add_subparsers(dest="verb", required=True)
    run = sub.add_parser("run", help="fill a plan")
    run.add_argument("plan", choices=sorted(PLANS))
    run.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    run.add_argument("--jobs", type=int, default=1, help="runs side by side")
    run.add_argument("--minutes", type=float, help="stop launching what would not finish by then; stop all at it")
    run.add_argument("--warm", help="RL cells start from the warm starts of this place (e.g. h200, copied back "
                     "from an archive); records go to results/<place>-warm-<WARM>/")
    run.add_argument("--archive", help="pack the records and warm starts into this .tar.gz at the end")
    one = sub.add_parser("cell", help="one cell and its record (what `run` starts)")
    one.add_argument("where")
    one.add_argument("cell", choices=sorted(CELLS))
    one.add_argument("seed", type=int)
    one.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    one.add_argument("--jobs", type=int, default=1)
    st = sub.add_parser("status", help="which cells of a plan have records")
    st.add_argument("plan", choices=sorted(PLANS))
    ren = sub.add_parser("render", help="rewrite the tables in README.md and docs/ from results/")
    ren.add_argument("--check", action="store_true", help="change nothing; exit 1 if a page differs")
    args = ap.parse_args(argv)
    global STORE
    STORE = os.path.abspath(args.store)
    if args.verb == "run":
        if args.device == "cuda":
            import torch
            if not torch.cuda.is_available():
                sys.exit("error: --device cuda: no GPU is visible to torch")
        if args.jobs < 1:
            sys.exit(f"error: --jobs {args.jobs}: at least one run at a time")
        run_plan(args)
    elif args.verb == "cell":
        run_cell(args)
    elif args.verb == "status":
        status(args)
    else:
        import results
        sys.exit(results.render_pages(check=args.check))


if __name__ == "__main__":
    main()

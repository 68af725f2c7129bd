"""The critic's held-out AUROC by state size, over seeds, presets and samplers, and its
calibration against the oracle on the states the reference search writes: markdown tables.

    python bench/critic.py --minutes 10 --seeds 0 1 2                    # README.md#results' critic row (tiny)
    python bench/critic.py --minutes 10 --seeds 0 1 2 --preset longproc
    python bench/critic.py --steps 800 --samplers hindsight trace        # samplers at equal steps

Each run is `critic.train` (what `python critic.py` runs), then `critic.evaluate` on the
held-out pairs of its preset, and `critic.calibration_error` (Brier score and ECE per state size)
on `critic.written_pairs`: every state the reference search writes on 200 held-out problems,
with its own target, the initial numbers included (the pairs a credit values). Runs go one after another; steps/min is the run's own rate, so
compare it only between runs of one invocation on an otherwise idle machine.
Imports: critic, torch.
"""
import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import critic  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--steps", type=int, help="train each run for this many steps instead of --minutes")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--samplers", nargs="+", default=["hindsight"])
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS") or 2))
    ap.add_argument("--save", metavar="DIR", help="also save each run's critic there")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pairs = critic.oracle_pairs(preset=args.preset)
    sizes = sorted(pairs, reverse=True)
    budget = f"{args.steps} steps" if args.steps else f"{args.minutes:g} min"
    head = " | ".join(f"AUROC {k} number{'s' * (k > 1)}" for k in sizes)
    rows = [f"| sampler | seed | steps ({budget}) | steps/min | {head} |", "|---" * (4 + len(sizes)) + "|"]
    written = critic.written_pairs(200, args.preset)
    shares = {k: sum(r for *_, r in written[k]) / len(written[k]) for k in written}
    calibration = ["| sampler | seed | " + " | ".join(f"Brier / ECE {k} ({shares[k]:.0%} reachable)" for k in written)
                   + " |", "|---" * (2 + len(written)) + "|"]
    for sampler in args.samplers:
        results = []
        for seed in args.seeds:
            model = critic.train(args.minutes, args.steps, sampler, args.preset, seed=seed, progress=False)
            aurocs = critic.evaluate(model, pairs)
            if args.save:
                os.makedirs(args.save, exist_ok=True)
                critic.save(model, os.path.join(args.save, f"critic_{args.preset}_{sampler}_{seed}.safetensors"))
            results.append(aurocs)
            errors = critic.calibration_error(model, written)
            calibration.append(f"| {sampler} | {seed} | "
                               + " | ".join(f"{errors[k][0]:.3f} / {errors[k][1]:.3f}" for k in written) + " |")
            steps, minutes = model.trained["steps"], model.trained["seconds"] / 60
            rows.append(f"| {sampler} | {seed} | {steps} | {steps / minutes:.0f} | "
                        + " | ".join(f"{aurocs[k]:.3f}" for k in sizes) + " |")
            print(rows[-1], flush=True)
        if len(results) > 1:
            cells = [f"{statistics.mean(r[k] for r in results):.3f} ± {statistics.stdev(r[k] for r in results):.3f}"
                     for k in sizes]
            rows.append(f"| {sampler} | mean ± std | | | " + " | ".join(cells) + " |")
    print(f"\n{args.preset} preset, held-out pairs per size: "
          + ", ".join(f"{k} numbers {len(pairs[k])}" for k in sizes) + "\n")
    print("\n".join(rows))
    print("\nCalibration against the oracle, written states with their own target (200 held-out problems):\n")
    print("\n".join(calibration))


if __name__ == "__main__":
    main()

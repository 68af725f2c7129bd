"""Tables rendered from results/ (the runs bench/runner.py kept), and the pages that show them.

    python bench/runner.py render            # rewrite every table block in README.md and docs/
    python bench/runner.py render --check    # exit 1 if one differs (tests/test_results.py)

A page holds a table as `<!-- table NAME -->`, the rendered lines, `<!-- /table -->`; NAME is
`<kind>-<place>`: kind one of TABLES, place a folder of results/ (`cpu`, `h200`). Every figure in
such a block comes from the records; a row missing some seeds' records is averaged over the
seeds it has and says which. Intervals are 95%: t over seeds (none for one seed), and, in
brackets after it, a normal interval over the problems, clustered by problem (each problem's
difference averaged over the seeds first: eval.clustered_difference).
"""
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from eval import clustered_difference, paired_difference, seed_interval  # noqa: E402
from runner import warm_place  # noqa: E402  (bench/ is on sys.path when runner.py or the tests import this)

RESULTS = os.path.join(ROOT, "results")
PAGES = ["README.md"] + sorted(os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))
                               if f.endswith(".md"))
BLOCK = re.compile(r"(<!-- table ([\w-]+) -->\n)(.*?)(<!-- /table -->)", re.S)
DEFAULT_CELL = "grpo-rounds4"  # the cell whose flags are train.py's RL defaults: the baseline of every row
CANDIDATES = ["grpo-rounds1", "grpo-rounds4", "grpo-rounds4-mask", "grpo-rounds4-g16", "grpo-rounds4-t12",
              "grpo-rounds4-kl", "grpo-rounds4-lr2", "grpo-rounds4-500", "grpo-rounds1-w3000", "grpo-rounds4-w3000"]
BASELINES = ["sft-alone-2964", "sft-every-2964"]


def load(where):
    """{cell: {seed: record}} of results/<where>/."""
    found = {}
    folder = os.path.join(RESULTS, where)
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.endswith(".json"):
            with open(os.path.join(folder, name)) as f:
                record = json.load(f)
            found.setdefault(record["cell"], {})[record["seed"]] = record
    return found


def bits(text):
    return [int(c) for c in text]


def rate(text):
    """The success rate of a record's per-problem string ("0110...")."""
    return sum(bits(text)) / len(text)


def pct(x, signed=False):
    return f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}"


def interval(lo, hi, signed=True):
    return "" if lo != lo else f" [{pct(lo, signed)}, {pct(hi, signed)}]"  # nan: one seed


def over_seeds(pairs):
    """Paired differences b - a for {seed: (a_bits, b_bits)}: 'mean [t over seeds] [over problems,
    clustered by problem]'."""
    per_seed = [paired_difference(a, b)[0] for a, b in pairs.values()]
    mean, lo, hi = seed_interval(per_seed)
    clustered = clustered_difference(list(pairs.values()))
    return f"{pct(mean, True)}{interval(lo, hi)}{interval(clustered[1], clustered[2])}"


def success(text):
    """A record's per-problem string as 'rate [interval over problems]'."""
    end = bits(text)
    _, lo, hi = paired_difference([0] * len(end), end)
    return f"{pct(rate(text))}{interval(lo, hi, False)}"


def mean_success(texts):
    """Per-problem strings of several seeds as 'mean [t over seeds] [over problems, clustered]'."""
    mean, lo, hi = seed_interval([rate(t) for t in texts])
    clustered = clustered_difference([([0] * len(t), bits(t)) for t in texts])
    return f"{pct(mean)}{interval(lo, hi, False)}{interval(clustered[1], clustered[2], False)}"


def seeds_of(row):
    return sorted(row)


def robust(found):
    """Candidate RL flags from the same warm starts: each seed's gain over its warm start (paired
    over problems), the mean gain, the difference to the default's final success, greedy guesses
    and answers out of tokens at the end, the OOD gain, minutes."""
    lines = ["| cell | gain per seed [over problems] | mean gain [t] [problems] | final | vs "
             f"{DEFAULT_CELL} [t] [problems] | guesses | out of tokens | OOD gain [t] [problems] | minutes |",
             "|---|---|---|---|---|---|---|---|---|"]
    base = found.get(DEFAULT_CELL, {})
    for cell in CANDIDATES:
        row = found.get(cell)
        if not row:
            continue
        seeds = seeds_of(row)
        per = []
        for s in seeds:
            d, lo, hi = paired_difference(bits(row[s]["solved_start"]), bits(row[s]["solved_end"]))
            per.append(f"s{s} {pct(d, True)}{interval(lo, hi)}")
        gain = over_seeds({s: (bits(row[s]["solved_start"]), bits(row[s]["solved_end"])) for s in seeds})
        final = seed_interval([rate(row[s]["solved_end"]) for s in seeds])
        common = [s for s in seeds if s in base]
        versus = "—" if cell == DEFAULT_CELL or not common else over_seeds(
            {s: (bits(base[s]["solved_end"]), bits(row[s]["solved_end"])) for s in common})
        warm = found.get(row[seeds[0]].get("warm_cell") or "warm", {})
        ood = over_seeds({s: (bits(warm[s]["ood"]["solved"]), bits(row[s]["ood"]["solved"]))
                          for s in seeds}) if all(s in warm for s in seeds) else "—"
        mean = lambda key: sum(row[s]["heldout_end"][key] for s in seeds) / len(seeds)  # noqa: E731
        minutes = sum(row[s]["minutes"] for s in seeds) / len(seeds)
        lines.append(f"| {cell} | {'; '.join(per)} | {gain} | {pct(final[0])}% | {versus} | "
                     f"{pct(mean('failed_guess'))}% | {pct(mean('failed_out_of_tokens'))}% | {ood} | "
                     f"{minutes:.1f} |")
    return "\n".join(lines)


def testbed(found):
    """The pipelines (SFT warm start, then each RL candidate present) against SFT alone for the
    same minutes: held-out success per seed, the mean, and each row's paired difference to the
    default RL cell (or the first candidate present)."""
    rl_cells = [c for c in CANDIDATES if c in found and (found[c][min(found[c])].get("warm_cell") or "warm") == "warm"]
    if not rl_cells:
        return ""
    base = DEFAULT_CELL if DEFAULT_CELL in rl_cells else rl_cells[0]
    rl = found[base]
    rows = [("SFT warm start", {s: r["solved_start"] for s, r in rl.items()}),
            *((f"SFT + GRPO ({cell})", {s: r["solved_end"] for s, r in found[cell].items()}) for cell in rl_cells),
            *((cell, {s: r["solved_end"] for s, r in found.get(cell, {}).items()}) for cell in BASELINES)]
    seeds = sorted(rl)
    lines = ["| | " + " | ".join(f"seed {s}" for s in seeds) + f" | mean [t] | vs {base} [t] [problems] |",
             "|---|" + "---|" * (len(seeds) + 2)]
    for name, solved in rows:
        if not solved:
            continue
        per = [pct(rate(solved[s])) if s in solved else "—" for s in seeds]
        mean = seed_interval([rate(solved[s]) for s in seeds if s in solved])
        common = [s for s in seeds if s in solved]
        diff = "—" if name == f"SFT + GRPO ({base})" else over_seeds(
            {s: (bits(rl[s]["solved_end"]), bits(solved[s])) for s in common})
        lines.append(f"| {name} | {' | '.join(per)} | {pct(mean[0])}{interval(mean[1], mean[2], False)} | {diff} |")
    return "\n".join(lines)


CHANGES = [("failed_guess", "guesses (share of answers)"), ("failed_out_of_tokens", "out of tokens (share)"),
           ("leaf_misses", "leaf misses per answer"), ("skipped_dead", "dead subtrees passed over per answer"),
           ("skipped_live", "live subtrees passed over per answer"), ("process_errors", "process errors per answer"),
           ("solved_with_errors", "solved with a process error (share)")]


def changed(found):
    """What RL changed in the greedy held-out answers, per seed: warm start -> end, of the default
    cell (or the first candidate present)."""
    present = [c for c in CANDIDATES if c in found]
    rl = found[DEFAULT_CELL if DEFAULT_CELL in found else present[0]] if present else {}
    seeds = sorted(rl)
    lines = ["| held-out answers | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
    for key, meaning in CHANGES:
        cells = [f"{rl[s]['heldout_start'][key]:.3f} -> {rl[s]['heldout_end'][key]:.3f}" for s in seeds]
        lines.append(f"| {meaning} | {' | '.join(cells)} |")
    return "\n".join(lines)


CREDITS = ["oracle-prune-rounds4", "oracle-steps1", "oracle-steps2", "critic-steps1", "critic-steps2",
           "critic-online-scratch", "critic-online", "grpo-rounds1", "oracle-steps2-rounds1", "grpo-rounds4-g16",
           "clipo-g16", "clipo-rounds4"]  # bench/runner.py's plan credits (oracle-prune-rounds4: the earlier cell)
# the cell each row answers its question against: GRPO with the row's other flags, or, for a critic,
# its upper bound (the oracle at the same coefficient) and, online, the offline critic it should match
CONTROLS = {"oracle-steps2-rounds1": "grpo-rounds1", "clipo-g16": "grpo-rounds4-g16",
            "critic-steps1": "oracle-steps1", "critic-steps2": "oracle-steps2",
            "critic-online-scratch": "critic-steps2", "critic-online": "critic-steps2"}


def credits(found):
    """Dense credit and CLIPO beside the default GRPO cell, from the same warm starts: held-out
    success at the end per seed, the mean, the paired difference to the default's end [t over
    seeds] [problems, clustered] and to its control (CONTROLS: GRPO with the row's other flags, a
    critic's oracle, an online critic's offline one), greedy guesses, process errors and dead / live
    subtrees passed over per answer at the end, the OOD gain over the warm start, and how much the
    cell's term moved the advantages per token over its last 25 steps (<term>/adv_shift; its critic's
    3-number AUROC where it has one)."""
    base = found.get(DEFAULT_CELL, {})
    seeds = sorted(base)
    lines = ["| cell | " + " | ".join(f"seed {s}" for s in seeds) + f" | mean [t] (its seeds) | vs {DEFAULT_CELL} [t] "
             "[problems] (paired) | vs its control (paired) | guesses (its seeds) | process errors | passed over: "
             "dead / live | OOD gain [t] [problems] | adv shift (AUROC 3) |", "|---|" + "---|" * (len(seeds) + 8)]
    for cell in [DEFAULT_CELL, *CREDITS]:
        row = {s: r for s, r in found.get(cell, {}).items() if s in base}
        if not row:
            continue
        mine = sorted(row)
        per = [pct(rate(row[s]["solved_end"])) if s in row else "—" for s in seeds]
        mean = seed_interval([rate(row[s]["solved_end"]) for s in mine])
        versus = "—" if cell == DEFAULT_CELL else over_seeds(
            {s: (bits(base[s]["solved_end"]), bits(row[s]["solved_end"])) for s in mine})
        control = found.get(CONTROLS.get(cell), {})
        both = [s for s in mine if s in control]
        against = f"{CONTROLS[cell]}: " + over_seeds(
            {s: (bits(control[s]["solved_end"]), bits(row[s]["solved_end"])) for s in both}) if both else "—"
        guesses = sum(row[s]["heldout_end"]["failed_guess"] for s in mine) / len(mine)
        warm = found.get(row[mine[0]].get("warm_cell") or "warm", {})
        ood = over_seeds({s: (bits(warm[s]["ood"]["solved"]), bits(row[s]["ood"]["solved"]))
                          for s in mine}) if all(s in warm for s in mine) else "—"
        def end(key):
            return sum(row[s]["heldout_end"][key] for s in mine) / len(mine)
        shifts = [v for s in mine for k, v in row[s]["rollouts_last25"].items() if k.endswith("/adv_shift")]
        aurocs = [row[s]["critic_auroc"]["3"] for s in mine if "critic_auroc" in row[s]]
        shift = (f"{sum(shifts) / len(shifts):.3f}" if shifts else "—") + (
            f" ({sum(aurocs) / len(aurocs):.3f})" if aurocs else "")
        lines.append(f"| {cell} | {' | '.join(per)} | {pct(mean[0])}{interval(mean[1], mean[2], False)} | {versus} | "
                     f"{against} | {pct(guesses)}% | {end('process_errors'):.2f} | {end('skipped_dead'):.2f} / "
                     f"{end('skipped_live'):.2f} | {ood} | {shift} |")
    return "\n".join(lines)


def warm(found):
    """The SFT default's warm starts: per seed the held-out curve, the end with its interval over
    problems, greedy guesses and answers out of tokens at the end, minutes (and how many runs
    shared the machine); then the mean over seeds [t] [over problems, clustered]."""
    row = found.get("warm", {})
    seeds = sorted(row)
    if not seeds:
        return "(no records yet)"
    steps = sorted({int(k) for s in seeds for k in row[s]["curve"]})
    lines = ["| seed | " + " | ".join(f"step {k:,}" for k in steps) + " | end [problems] | guesses | out of tokens "
             "| minutes (runs side by side) |", "|---" * (len(steps) + 5) + "|"]
    for s in seeds:
        r = row[s]
        lines.append(f"| {s} | " + " | ".join(pct(r["curve"].get(str(k), float("nan"))) for k in steps)
                     + f" | {success(r['solved_end'])} | {pct(r['heldout_end']['failed_guess'])}% "
                     f"| {pct(r['heldout_end']['failed_out_of_tokens'])}% | {r['minutes']:.1f} ({r['runs_beside']}) |")
    lines.append(f"| mean [t] [problems] | " + " | ".join(
        pct(sum(row[s]["curve"].get(str(k), 0.0) for s in seeds) / len(seeds)) for k in steps)
        + f" | {mean_success([row[s]['solved_end'] for s in seeds])} | "
        f"{pct(sum(row[s]['heldout_end']['failed_guess'] for s in seeds) / len(seeds))}% | "
        f"{pct(sum(row[s]['heldout_end']['failed_out_of_tokens'] for s in seeds) / len(seeds))}% | |")
    return "\n".join(lines)


SFT_ALONE = "sft-alone-8000"  # SFT alone for about the pipeline's 2-core minutes (bench/runner.py)
CEILING = 0.524  # the noiseless reference search's held-out success under the 160-token budget


def pipeline(found):
    """The user's pipeline per seed: the warm start, + GRPO (DEFAULT_CELL: the RL defaults) with its paired
    gain [problems], its distance above the imitation ceiling, SFT alone for the pipeline's
    minutes and GRPO's paired difference to it [problems], greedy failed guesses and answers out
    of tokens (warm start -> end), and the minutes of each stage (runs sharing the machine); then
    the mean over seeds [t] [problems]."""
    rl, alone = found.get(DEFAULT_CELL, {}), found.get(SFT_ALONE, {})
    seeds = sorted(rl)
    if not seeds:
        return "(no records yet)"
    lines = ["| seed | warm start | + GRPO [problems] | gain [problems] | above the ceiling | SFT alone: GRPO - it "
             "[problems] | failed guesses | out of tokens | minutes: warm + RL (runs side by side) |", "|---" * 9 + "|"]
    warm = found.get("warm", {})
    for s in seeds:
        r = rl[s]
        start, end = bits(r["solved_start"]), bits(r["solved_end"])
        gain = paired_difference(start, end)
        w, versus = warm.get(s), "—"
        if s in alone:
            over = paired_difference(bits(alone[s]["solved_end"]), end)
            versus = f"{pct(rate(alone[s]['solved_end']))}: {pct(over[0], True)}{interval(over[1], over[2])}"
        minutes = (f"{w['minutes']:.1f} ({w['runs_beside']}) + " if w else "— + ") + f"{r['minutes']:.1f} ({r['runs_beside']})"
        lines.append(f"| {s} | {pct(rate(r['solved_start']))} | {success(r['solved_end'])} | "
                     f"{pct(gain[0], True)}{interval(gain[1], gain[2])} | {pct(rate(r['solved_end']) - CEILING, True)} | "
                     f"{versus} | "
                     f"{pct(r['heldout_start']['failed_guess'])} -> {pct(r['heldout_end']['failed_guess'])}% | "
                     f"{pct(r['heldout_start']['failed_out_of_tokens'])} -> {pct(r['heldout_end']['failed_out_of_tokens'])}% "
                     f"| {minutes} |")
    start = sum(rate(rl[s]["solved_start"]) for s in seeds) / len(seeds)
    gain = over_seeds({s: (bits(rl[s]["solved_start"]), bits(rl[s]["solved_end"])) for s in seeds})
    mine = [s for s in seeds if s in alone]
    versus = "—" if not mine else (
        f"{pct(sum(rate(alone[s]['solved_end']) for s in mine) / len(mine))}: "
        f"{over_seeds({s: (bits(alone[s]['solved_end']), bits(rl[s]['solved_end'])) for s in mine})}"
        + (f" (seed{'s' * (len(mine) > 1)} {', '.join(map(str, mine))})" if len(mine) < len(seeds) else ""))
    end = sum(rate(rl[s]["solved_end"]) for s in seeds) / len(seeds)
    lines.append(f"| mean [t] [problems] | {pct(start)} | {mean_success([rl[s]['solved_end'] for s in seeds])} | "
                 f"{gain} | {pct(end - CEILING, True)} | {versus}"
                 + f" | {pct(sum(rl[s]['heldout_start']['failed_guess'] for s in seeds) / len(seeds))} -> "
                 f"{pct(sum(rl[s]['heldout_end']['failed_guess'] for s in seeds) / len(seeds))}% | | |")
    return "\n".join(lines)


TABLES = {"robust": robust, "testbed": testbed, "changed": changed, "credits": credits, "warm": warm,
          "pipeline": pipeline}


def render(name):
    kind, _, where = name.partition("-")
    if kind not in TABLES:
        raise ValueError(f"table {name!r}: expected <{'|'.join(TABLES)}>-<place>")
    found = load(where)
    if warm_place(where) != where:  # RL here from warm starts trained elsewhere (runner.py --warm): their SFT records
        for cell, row in load(warm_place(where)).items():
            if next(iter(row.values()))["flags"]["mode"] == "sft":
                found.setdefault(cell, row)
    return TABLES[kind](found)


def render_pages(check=False):
    """Rewrite (or with `check`, compare) every table block; 0 when every page is as rendered."""
    stale = []
    for page in PAGES:
        path = os.path.join(ROOT, page)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        new = BLOCK.sub(lambda m: m.group(1) + render(m.group(2)) + "\n" + m.group(4), text)
        if new != text:
            stale.append(page)
            if not check:
                with open(path, "w", encoding="utf-8") as f:
                    f.write(new)
    for page in stale:
        print(f"{page}: {'differs from its render' if check else 'rendered'}")
    return 1 if check and stale else 0

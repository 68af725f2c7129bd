"""results/ and the tables rendered from it: every table block in README.md and docs/ is exactly its
render from the run records (no figure without its record), the renders compute what a hand
computation of the same records gives, and the runner fills a plan, skips what has a record and
resumes what it stopped."""
import json
import shutil
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import results  # noqa: E402
import runner  # noqa: E402


def test_every_table_in_the_pages_is_its_render():
    assert results.render_pages(check=True) == 0, "run: python bench/runner.py render"


def test_every_table_block_has_records():
    for page in results.PAGES:
        with open(os.path.join(ROOT, page), encoding="utf-8") as f:
            for _, name, body, _ in results.BLOCK.findall(f.read()):
                assert body.count("\n") >= 3, f"{page}: table {name} renders no row (no records?)"


def record(cell, seed, start, end, ood="0000", rollouts_last25=None, **heldout):
    counts = {key: 0.0 for key, _ in results.CHANGES}
    return {"cell": cell, "seed": seed, "solved_start": start, "solved_end": end, "minutes": 2.0,
            "heldout_start": counts, "heldout_end": {**counts, **heldout}, "ood": {"solved": ood},
            "rollouts_last25": rollouts_last25 or {}}


@pytest.fixture
def fake_results(tmp_path, monkeypatch):
    """Records of two seeds with 4 problems each, written where results.load reads them."""
    folder = tmp_path / "lab"
    folder.mkdir()
    records = [record("warm", 0, "0000", "1100", ood="0000"), record("warm", 1, "0000", "1000", ood="0000"),
               record("grpo-rounds1", 0, "1100", "1110", ood="1000", failed_guess=0.25),
               record("grpo-rounds1", 1, "1000", "1111", ood="1100", failed_guess=0.75),
               record("sft-every-2964", 0, "0000", "1000"), record("sft-every-2964", 1, "0000", "1100")]
    for r in records:
        (folder / f"{r['cell']}-s{r['seed']}.json").write_text(json.dumps(r))
    monkeypatch.setattr(results, "RESULTS", str(tmp_path))


def test_robust_table_against_a_hand_computation(fake_results):
    row = results.render("robust-lab").splitlines()[2].split(" | ")
    # gains: seed 0 1100 -> 1110 = +25 points, seed 1 1000 -> 1111 = +75; mean +50
    assert row[1].startswith("s0 +25.0") and "s1 +75.0" in row[1]
    assert row[2].startswith("+50.0 [")
    # t interval over two seeds: mean 50, sd 35.36, t(1) 12.706: +/- 317.7
    lo, hi = (float(x) for x in row[2].split("[")[1].rstrip("] ").split(", "))
    assert (lo, hi) == pytest.approx((50 - 12.706 * 35.355 / 2 ** 0.5, 50 + 12.706 * 35.355 / 2 ** 0.5), abs=0.1)
    assert row[3] == "87.5%"  # final: 3/4 and 4/4
    assert row[5] == "50.0%"  # guesses: mean of 0.25 and 0.75
    assert row[7].startswith("+37.5 [")  # OOD: 0000 -> 1000 and 0000 -> 1100


def test_testbed_table_against_a_hand_computation(fake_results):
    lines = results.render("testbed-lab").splitlines()
    warm, rl, every = (line.split(" | ") for line in lines[2:5])
    assert warm[1:3] == ["50.0", "25.0"] and rl[1:3] == ["75.0", "100.0"] and every[1:3] == ["25.0", "50.0"]
    assert every[4].startswith("-50.0 [")  # (25 - 75 and 50 - 100) / 2


def test_credits_table_against_a_hand_computation(tmp_path, monkeypatch):
    folder = tmp_path / "lab"
    folder.mkdir()
    records = [record("warm", 0, "0000", "1000", ood="0000"), record("warm", 1, "0000", "1000", ood="1000"),
               record("grpo-rounds4", 0, "1000", "1100", ood="1000"), record("grpo-rounds4", 1, "1000", "1110"),
               record("clipo-rounds4", 0, "1000", "1111", ood="1100", failed_guess=0.5, process_errors=0.25,
                      skipped_dead=1.5, skipped_live=0.125, rollouts_last25={"clipo/adv_shift": 0.125}),
               record("grpo-rounds4-g16", 1, "1000", "1000"), record("clipo-g16", 0, "1000", "0000"),
               record("clipo-g16", 1, "1000", "1100"), record("oracle-steps2", 0, "1000", "1110"),
               {**record("critic-steps2", 0, "1000", "1000"), "critic_auroc": {"3": 0.9, "2": 0.99}}]
    for r in records:
        (folder / f"{r['cell']}-s{r['seed']}.json").write_text(json.dumps(r))
    monkeypatch.setattr(results, "RESULTS", str(tmp_path))
    lines = results.render("credits-lab").splitlines()
    grpo, oracle, critic, g16, clipo16, clipo = (line.split(" | ") for line in lines[2:8])
    assert grpo[1:3] == ["50.0", "75.0"] and grpo[3].startswith("62.5 [") and grpo[4:6] == ["—", "—"]
    assert clipo[1:3] == ["100.0", "—"] and clipo[3] == "100.0"  # one seed: no t interval
    assert clipo[4].startswith("+50.0 [") and clipo[5] == "—"  # 1100 -> 1111, paired over the 4 problems; no control
    assert clipo[6:9] == ["50.0%", "0.25", "1.50 / 0.12"] and clipo[9].startswith("+50.0")  # OOD: 0000 -> 1100
    assert clipo[10] == "0.125 |" and grpo[10] == "— |"  # the term's shift of the advantages
    # CLIPO at 16 against GRPO at 16 on the seed both have (1: 1000 -> 1100), against GRPO at 8 on both (-50, -25)
    assert g16[5] == "—" and clipo16[5].startswith("grpo-rounds4-g16: +25.0 [") and clipo16[4].startswith("-37.5 [")
    # the critic against its upper bound, the oracle at the same coefficient (1110 -> 1000: -50), its AUROC beside
    assert oracle[5] == "—" and critic[5].startswith("oracle-steps2: -50.0 [") and critic[10] == "— (0.900) |"


def test_pipeline_table_against_a_hand_computation(tmp_path, monkeypatch):
    folder = tmp_path / "lab"
    folder.mkdir()
    records = [record("warm", 0, "0000", "1000"), record("warm", 1, "0000", "1100"),
               record("grpo-rounds4", 0, "1000", "1110", failed_guess=0.25),
               record("grpo-rounds4", 1, "1100", "1111"),
               record("sft-alone-8000", 0, "0000", "0100")]
    for r in records:
        r["runs_beside"] = 1
        (folder / f"{r['cell']}-s{r['seed']}.json").write_text(json.dumps(r))
    monkeypatch.setattr(results, "RESULTS", str(tmp_path))
    s0, s1, mean = (line.split(" | ") for line in results.render("pipeline-lab").splitlines()[2:5])
    # 1110: differences to 0 are 1, 1, 1, 0: mean 0.75, sd 0.5, se 0.25, 0.75 +- 1.96 x 0.25
    assert s0[1:3] == ["25.0", "75.0 [26.0, 124.0]"]
    assert s0[3].startswith("+50.0 [") and s0[4] == f"{100 * (0.75 - results.CEILING):+.1f}"
    assert s0[5].startswith("25.0: +50.0 [")  # SFT alone 0100, GRPO 1110: differences 1, 0, 1, 0
    assert s1[5] == "—" and s0[6] == "0.0 -> 25.0%"
    assert mean[1] == "37.5" and mean[5].startswith("25.0: +50.0") and mean[5].endswith("(seed 0)")


def test_a_page_that_differs_from_its_render_is_found(fake_results, tmp_path, monkeypatch):
    page = tmp_path / "page.md"
    page.write_text("x\n<!-- table testbed-lab -->\n| stale |\n<!-- /table -->\n")
    monkeypatch.setattr(results, "ROOT", str(tmp_path))
    monkeypatch.setattr(results, "PAGES", ["page.md"])
    assert results.render_pages(check=True) == 1
    assert results.render_pages() == 0 and results.render_pages(check=True) == 0
    assert "| SFT warm start | 50.0 | 25.0 |" in page.read_text()


def test_the_runner_fills_a_plan_skips_records_and_resumes(tmp_path, monkeypatch):
    """The smoke plan (an SFT warm start, then RL from it) in a folder of its own: a warm start
    that stopped after 10 of its 30 steps is resumed, not restarted; RL starts from its final
    weights; each record names its command and seed; a second run starts nothing."""
    import cli
    import train
    monkeypatch.setattr(runner, "STORE", runner.STORE)  # main() sets it from --store: put back after
    monkeypatch.setattr(runner, "PLANS", {"smoke": (["smoke-warm", "smoke-grpo"], (0,))})
    store = ["--store", str(tmp_path)]
    runner.STORE = str(tmp_path)
    stopped = runner.command("cpu", "smoke-warm", 0, alone=False)[2:]
    stopped[stopped.index("--steps") + 1] = "10"  # as if it had stopped at step 10
    assert cli.run(train.main, stopped).returncode == 0
    runner.main([*store, "run", "smoke"])
    warm = json.load(open(runner.record_path("cpu", "smoke-warm", 0)))
    rl = json.load(open(runner.record_path("cpu", "smoke-grpo", 0)))
    assert "--resume" in warm["command"] and warm["steps"] == 30 and warm["seed"] == 0
    assert list(warm["curve"]) == ["10", "30"]  # the first 10 steps kept, not run again
    assert rl["solved_start"] == warm["solved_end"]  # RL started from the warm start's final weights
    assert len(rl["ood"]["solved"]) == len(rl["solved_end"]) == 50
    before = os.path.getmtime(runner.record_path("cpu", "smoke-grpo", 0))
    runner.main([*store, "run", "smoke"])
    assert os.path.getmtime(runner.record_path("cpu", "smoke-grpo", 0)) == before


def test_minutes_stop_a_cell_that_a_later_run_resumes(tmp_path, monkeypatch):
    """--minutes: a cell still running at the deadline gets SIGTERM, saves a checkpoint and
    leaves no record (a later `run` resumes it)."""
    monkeypatch.setattr(runner, "STORE", runner.STORE)
    monkeypatch.setattr(runner, "PLANS", {"stop": (["smoke-stop"], (0,))})
    runner.main(["--store", str(tmp_path), "run", "stop", "--minutes", "0.5"])
    assert not os.path.exists(runner.record_path("cpu", "smoke-stop", 0))
    assert os.path.exists(os.path.join(runner.run_dir("cpu", "smoke-stop", 0), "latest"))


def test_a_stop_to_the_runner_stops_its_cells_and_a_cell_never_saved_starts_afresh(tmp_path):
    """Cells run in sessions of their own (a terminal's Ctrl-C does not reach them): a SIGTERM to
    `runner.py run` must reach them, or they go on as orphans. The cell saves and the runner
    exits; then, as if it had been killed before its first checkpoint, the cell keeps its logs
    but no checkpoint, and the next `run` starts it afresh (train.py refuses a directory that
    holds another run without --resume)."""
    import signal
    import subprocess
    import time
    script = ("import sys; sys.path.insert(0, sys.argv[1]); import runner; "
              "runner.PLANS['stop'] = (['smoke-stop'], (0,)); runner.main(['--store', sys.argv[2], 'run', 'stop'] + sys.argv[3:])")
    cell = os.path.join(tmp_path, "runs", "cells", "cpu", "s0", "smoke-stop")
    proc = subprocess.Popen([sys.executable, "-c", script, os.path.join(ROOT, "bench"), str(tmp_path)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not os.path.exists(os.path.join(cell, "metrics.jsonl")) and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(3)  # into the run's steps
    proc.send_signal(signal.SIGTERM)
    said = proc.communicate(timeout=240)[0]
    assert "SIGTERM: stopping 1 runs" in said, said
    left = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout.split()
    assert left == [], f"cells outlived their runner: {left}"
    assert os.path.exists(os.path.join(cell, "latest"))
    shutil.rmtree(os.path.join(cell, "checkpoints"))
    os.remove(os.path.join(cell, "latest"))
    said = subprocess.run([sys.executable, "-c", script, os.path.join(ROOT, "bench"), str(tmp_path), "--minutes", "0.3"],
                          cwd=ROOT, capture_output=True, text=True, timeout=240).stdout
    assert "--minutes 0.3 reached: stopping 1 runs" in said, said
    assert os.path.exists(os.path.join(cell, "latest"))  # it ran and saved again: not refused


def test_a_cell_s_train_py_hears_the_stops_its_runner_ignores():
    """run_cell ignores SIGTERM and SIGINT (it outlives train.py to write the record); its child
    inherited that, so a --minutes stop during the step-0 evaluation or a warm-up was dropped.
    With runner.default_signals the child starts with both as a new process has them."""
    import subprocess
    probe = "import signal; print(*(signal.getsignal(s) == signal.SIG_IGN for s in (signal.SIGTERM, signal.SIGINT)))"
    parent = ("import signal, subprocess, sys; sys.path.insert(0, sys.argv[1]); import runner; "
              "signal.signal(signal.SIGTERM, signal.SIG_IGN); signal.signal(signal.SIGINT, signal.SIG_IGN); "
              f"subprocess.call([sys.executable, '-c', {probe!r}]); "
              f"subprocess.call([sys.executable, '-c', {probe!r}], preexec_fn=runner.default_signals)")
    out = subprocess.run([sys.executable, "-c", parent, os.path.join(ROOT, "bench")], capture_output=True, text=True,
                         timeout=120, cwd=ROOT).stdout.splitlines()
    assert out == ["True True", "False False"], out  # ignored as inherited; then heard

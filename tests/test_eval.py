"""eval.py: metric arithmetic on planted completions, the command line's errors, the plot."""
import json
import math

import pytest

import cli
import countdown
import eval as evaluation
from model import TinyTokenizer, new_tiny_model, save_model
from sample import Samples

PROBLEMS = [countdown.Problem((21, 16, 17, 26), 46), countdown.Problem((7, 3, 12, 25), 50)]


def test_metrics_on_planted_completions(monkeypatch):
    tok = TinyTokenizer()
    right = [countdown.search_trace(*p, style="compact") for p in PROBLEMS]
    wrong_but_formatted = "<Solution>\n7 + 3 = 10\n12 - 10 = 2\n25 + 2 = 27\n</Solution>"
    texts = [right[0], "no solution", right[0], right[1], right[1], wrong_but_formatted]  # 2 problems x 3 samples

    def planted(model, prompts, max_new_tokens, **kw):
        assert kw["num_samples"] == 3 and len(prompts) == 2
        tokens = [tok.encode(t) for t in texts]
        return Samples(tokens, [[0.0] * len(t) for t in tokens], [True] * len(tokens))
    monkeypatch.setattr(evaluation, "sample", planted)
    m = evaluation.evaluate(new_tiny_model(), tok, PROBLEMS, samples=3, temperature=1.0)
    assert m["success_rate"] == pytest.approx(4 / 6)
    assert m["pass_at_k"] == 1.0
    assert m["format_error_rate"] == pytest.approx(1 / 6)
    assert m["mean_length"] == pytest.approx(sum(len(tok.encode(t)) for t in texts) / 6)


def _eval(*argv):
    return cli.run(evaluation.main, argv)


def test_command_line_errors_are_clear(tmp_path):
    missing = _eval("--model", str(tmp_path / "nothing"))
    assert missing.returncode != 0 and "no model at" in missing.stderr
    model_dir = tmp_path / "m"
    save_model(new_tiny_model(), TinyTokenizer(), str(model_dir))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"nums": [1, 2], "target": 3}\n{"nums": "x"}\n')
    broken = _eval("--model", str(model_dir), "--data", str(bad))
    assert broken.returncode != 0 and "bad.jsonl: record 2" in broken.stderr
    greedy = _eval("--model", str(model_dir), "--samples", "4")
    assert greedy.returncode != 0 and "--temperature > 0" in greedy.stderr


def test_side_by_side_table_and_json(tmp_path, longproc_path):
    for name in ("a", "b"):
        save_model(new_tiny_model(seed=len(name)), TinyTokenizer(), str(tmp_path / name))
    out = _eval("--model", str(tmp_path / "a"), "--model", str(tmp_path / "b"), "--data", str(longproc_path),
                "--max-new-tokens", "4", "--json", str(tmp_path / "r.json"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| success_rate [95% Wilson] |" in out.stdout and str(tmp_path / "b") in out.stdout
    results = json.loads((tmp_path / "r.json").read_text())
    assert set(results) == {str(tmp_path / "a"), str(tmp_path / "b")}
    assert set(evaluation.KEYS) <= set(results[str(tmp_path / "a")])
    assert results[str(tmp_path / "a")]["mean_length"] == 4  # random weights never stop early


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{"step": 0, "heldout/success_rate": 0.3}, {"step": 1, "reward_mean": 0.2, "heldout/success_rate": 0.4}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = _eval("--plot", str(path), "--out", str(tmp_path / "c.png"))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_wilson_interval_against_known_values_and_coverage():
    # Wilson (1927) by hand for 46/100: centre (0.46 + z^2/200) / (1 + z^2/100)
    lo, hi = evaluation.wilson(46, 100)
    assert lo == pytest.approx(0.36561, abs=1e-5) and hi == pytest.approx(0.55735, abs=1e-5)
    assert evaluation.wilson(0, 50)[0] == 0.0 and evaluation.wilson(50, 50)[1] == pytest.approx(1.0)
    # coverage: for p = 0.3 and n = 200 the interval holds p in ~95% of binomial draws
    import random
    rng = random.Random(0)
    hits = sum(lo <= 0.3 <= hi for lo, hi in (evaluation.wilson(sum(rng.random() < 0.3 for _ in range(200)), 200)
                                             for _ in range(2000)))
    assert 0.93 < hits / 2000 < 0.97


def test_paired_difference_and_seed_interval_by_hand():
    a, b = [1, 0, 1, 1, 0, 0, 1, 0], [1, 1, 1, 1, 0, 1, 1, 0]
    mean, lo, hi = evaluation.paired_difference(a, b)
    d = [y - x for x, y in zip(a, b)]  # two +1s among eight problems
    sd = (sum((x - 0.25) ** 2 for x in d) / 7) ** 0.5
    assert mean == 0.25 and lo == pytest.approx(0.25 - 1.959964 * sd / 8 ** 0.5) and hi > mean
    with pytest.raises(ValueError):
        evaluation.paired_difference([1, 0], [1])
    mean, lo, hi = evaluation.seed_interval([0.50, 0.55, 0.45])
    assert mean == pytest.approx(0.5) and hi - mean == pytest.approx(4.303 * 0.05 / 3 ** 0.5)


def test_two_models_print_a_paired_difference(tmp_path):
    for name in ("a", "b"):
        save_model(new_tiny_model(seed=len(name)), TinyTokenizer(), str(tmp_path / name))
    out = _eval("--model", str(tmp_path / "a"), "--model", str(tmp_path / "b"), "--procedural", "5",
                "--max-new-tokens", "4")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "success_rate [95% Wilson] | 0.0% [0.0, 43.4]" in out.stdout  # 0 of 5: Wilson's upper end
    assert f"{tmp_path / 'b'} - {tmp_path / 'a'}: +0.0 points, paired 95% interval [+0.0, +0.0] (5 problems)" in out.stdout


def test_the_interval_over_problems_is_clustered_by_problem():
    """Two seeds on the same 4 problems: each problem's difference is averaged over the seeds
    first (1, 0, 0.5, 0 here), by hand; the pooled interval over the 8 pairs is narrower."""
    a1, b1, a2, b2 = [0, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 1], [1, 0, 0, 1]
    mean, lo, hi = evaluation.clustered_difference([(a1, b1), (a2, b2)])
    d = [1.0, 0.0, 0.5, 0.0]
    m = sum(d) / 4
    half = evaluation.Z95 * math.sqrt(sum((x - m) ** 2 for x in d) / 3) / 2
    assert (mean, lo, hi) == pytest.approx((m, m - half, m + half))
    pooled = evaluation.paired_difference(a1 + a2, b1 + b2)
    assert pooled[0] == pytest.approx(mean) and pooled[2] - pooled[1] < hi - lo
    with pytest.raises(ValueError):
        evaluation.clustered_difference([(a1, b1), (a2[:3], b2[:3])])

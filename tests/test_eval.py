"""eval.py: metric arithmetic on planted completions, the command line's errors, the plot."""
import json
import os
import subprocess
import sys

import pytest

import countdown
import eval as evaluation
from model import TinyTokenizer, new_tiny_model, save_model
from sample import Rollouts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBLEMS = [countdown.Problem((21, 16, 17, 26), 46), countdown.Problem((7, 3, 12, 25), 50)]


def test_metrics_on_planted_completions(monkeypatch):
    tok = TinyTokenizer()
    right = [countdown.search_trace(*p, style="compact") for p in PROBLEMS]
    wrong_but_formatted = "<Solution>\n7 + 3 = 10\n12 - 10 = 2\n25 + 2 = 27\n</Solution>"
    texts = [right[0], "no solution", right[0], right[1], right[1], wrong_but_formatted]  # 2 problems x 3 samples

    def planted(model, prompts, max_new_tokens, **kw):
        assert kw["num_samples"] == 3 and len(prompts) == 2
        tokens = [tok.encode(t) for t in texts]
        return Rollouts(tokens, [[0.0] * len(t) for t in tokens], [True] * len(tokens))
    monkeypatch.setattr(evaluation, "sample", planted)
    m = evaluation.evaluate(new_tiny_model(), tok, PROBLEMS, samples=3, temperature=1.0)
    assert m["success_rate"] == pytest.approx(4 / 6)
    assert m["pass_at_k"] == 1.0
    assert m["format_error_rate"] == pytest.approx(1 / 6)
    assert m["mean_length"] == pytest.approx(sum(len(tok.encode(t)) for t in texts) / 6)


def _eval(*argv):
    return subprocess.run([sys.executable, "eval.py", *argv], capture_output=True, text=True, cwd=ROOT, timeout=300)


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
    assert "| success_rate |" in out.stdout and str(tmp_path / "b") in out.stdout
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

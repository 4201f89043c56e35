"""Comparing two head-score files: overlap, correlations, refusals, plot and CLI."""

from __future__ import annotations

import json

import pytest

from selective_attention.cli import main
from selective_attention.heads.compare import compare_head_scores
from selective_attention.heads import save_head_scores


def _write(path, scores, model="tiny", language="en", haystack_language="en", layers=2, heads=3):
    save_head_scores(path, scores, {"model": model, "num_layers": layers, "num_heads": heads, "counted_trials": 2,
                                    "language": language, "haystack_language": haystack_language})
    return path


def _scores(values):
    return {f"{layer}-{head}": values.get((layer, head), [0.0, 0.0]) for layer in range(2) for head in range(3)}


def test_overlap_and_correlation(tmp_path):
    a = _write(tmp_path / "a.json", _scores({(0, 1): [1.0, 0.8], (1, 2): [0.5, 0.5], (1, 0): [0.2, 0.0]}))
    b = _write(tmp_path / "b.json", _scores({(0, 1): [0.9, 0.9], (1, 0): [0.6, 0.4], (0, 0): [0.1, 0.1]}),
               haystack_language="zh")
    comparison = compare_head_scores(a, b, k=2)
    assert comparison.labels == ("en needle / en haystack", "en needle / zh haystack")
    assert comparison.top_a == [(0, 1), (1, 2)] and comparison.top_b == [(0, 1), (1, 0)]
    assert comparison.overlap == [(0, 1)] and comparison.jaccard == pytest.approx(1 / 3)
    assert compare_head_scores(a, a, k=3).spearman == pytest.approx(1.0)
    assert -1 <= comparison.spearman <= 1


def test_refuses_files_of_other_models(tmp_path):
    a = _write(tmp_path / "a.json", _scores({}))
    other = _write(tmp_path / "b.json", _scores({}), model="other")
    with pytest.raises(ValueError, match="compare files of one model"):
        compare_head_scores(a, other)
    bigger = _write(tmp_path / "c.json", {f"{l}-{h}": [0.0] for l in range(3) for h in range(3)}, layers=3)
    with pytest.raises(ValueError, match="different models"):
        compare_head_scores(a, bigger)
    with pytest.raises(ValueError, match="k must be"):
        compare_head_scores(a, a, k=0)


def test_compare_command_writes_plot_and_json(tmp_path, capsys):
    a = _write(tmp_path / "a.json", _scores({(0, 1): [1.0, 0.8]}))
    b = _write(tmp_path / "b.json", _scores({(0, 1): [0.5, 0.5], (1, 1): [0.2, 0.2]}), haystack_language="de")
    assert main(["--log-level", "WARNING", "compare", str(a), str(b), "-k", "2", "--output",
                 str(tmp_path / "c.png"), "--json", str(tmp_path / "c.json")]) == 0
    assert (tmp_path / "c.png").read_bytes().startswith(b"\x89PNG")
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["overlap"] == ["0-1"] and data["top_b"] == ["0-1", "1-1"]
    assert "top-2 overlap: 1 heads 0-1" in capsys.readouterr().out

"""Plots: grids computed right, PNGs written, CLI wiring."""

from __future__ import annotations

import json
import math

import pytest

from selective_attention.cli import main
from selective_attention.heads import save_head_scores
from selective_attention.plots import head_matrix, niah_grid, plot_head_scores, plot_niah, plot_top_heads

PNG = b"\x89PNG"


def results(scale: float) -> list[dict]:
    return [{"context_length": n, "depth_percent": d, "score": scale * (d + n / 100)}
            for n in (500, 1000) for d in (0.0, 50.0, 100.0)] + [
        {"context_length": 500, "depth_percent": 0.0, "score": 0.0}]  # a second needle at one point


def test_niah_grid_averages_and_orders():
    depths, lengths, grid = niah_grid(results(0.5))
    assert depths == [0.0, 50.0, 100.0] and lengths == [500, 1000]
    assert grid[0, 0] == pytest.approx((0.5 * 5 + 0) / 2)
    assert grid[2, 1] == pytest.approx(0.5 * 110)
    _, _, sparse = niah_grid([{"context_length": 1, "depth_percent": 0, "score": 1},
                              {"context_length": 2, "depth_percent": 50, "score": 2}])
    assert math.isnan(sparse[1, 0])
    with pytest.raises(ValueError):
        niah_grid([])


def test_plots_write_pngs(tmp_path):
    out = plot_niah([("no mask", results(0.8)), ("top-20 masked", results(0.1))], tmp_path / "niah.png", title="t")
    assert out.read_bytes()[:4] == PNG
    scores = {f"{l}-{h}": [l / 10, h / 10] for l in range(3) for h in range(2)}
    matrix = head_matrix(scores)
    assert matrix.shape == (3, 2) and matrix[2, 1] == pytest.approx(0.15)
    assert head_matrix(scores, 4, 3).shape == (4, 3)
    assert plot_head_scores(scores, tmp_path / "heads.png").read_bytes()[:4] == PNG
    assert plot_top_heads(scores, tmp_path / "top.png", k=3).read_bytes()[:4] == PNG


def test_plot_cli(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for i, point in enumerate(results(1.0)[:6]):
        (run / f"p{i}_results.json").write_text(json.dumps(point))
    (run / "run.json").write_text(json.dumps({"label": "my run"}))
    scores_path = tmp_path / "head_scores.json"
    save_head_scores(scores_path, {"0-0": [0.5], "1-1": [0.25]}, {"model": "m", "num_layers": 2, "num_heads": 2})
    assert main(["plot", "niah", str(run), str(run), "--output", str(tmp_path / "n.png")]) == 0
    assert main(["plot", "heads", str(scores_path), "--output", str(tmp_path / "h.png")]) == 0
    assert main(["plot", "top", str(scores_path), "-k", "5", "--output", str(tmp_path / "t.png")]) == 0
    for name in ("n.png", "h.png", "t.png"):
        assert (tmp_path / name).read_bytes()[:4] == PNG
    assert main(["plot", "niah", str(tmp_path / "missing"), "--output", str(tmp_path / "x.png")]) == 2
    assert main(["plot", "niah", str(run), "--labels", "a,b", "--output", str(tmp_path / "x.png")]) == 2

"""The needle recipe (detect -> needle grid per mask -> plots) on a tiny random Llama: outputs, resume, refusal."""

from __future__ import annotations

import json

import pytest

from selective_attention.finetune import load_config
from selective_attention.finetune.needle_recipe import NeedleRecipeConfig, run_needle_recipe
from selective_attention.heads import load_head_scores, select_heads

from .test_recipes import ROOT, tiny_model_dir  # noqa: F401  (fixture)


def _config(tmp_path, model_dir, **values) -> NeedleRecipeConfig:
    settings = {"output_dir": str(tmp_path / "needle"), "model": str(model_dir),
                "detect": {"lengths": [60], "depths": [50], "max_new_tokens": 3},
                "needle": {"lengths": [60], "depths": [20, 80], "max_new_tokens": 3},
                "rouge_threshold": -1.0,  # a random model never recalls the needle: count every trial
                "masks": [None, "top:3", "random:3"], "mask_mode": "uniform", "plot_top": 5}
    settings.update(values)
    return load_config(NeedleRecipeConfig, ROOT / "recipes" / "configs" / "needle_cpu.yaml", values=settings)


def test_needle_recipe_runs_every_stage_and_resumes(tmp_path, tiny_model_dir):  # noqa: F811
    config = _config(tmp_path, tiny_model_dir)
    summary = run_needle_recipe(config, progress=False)
    out = tmp_path / "needle"
    scores = load_head_scores(out / "head_scores.json")
    assert len(scores) == 2 * 4
    for name in ("head_scores.png", "top_heads.png", "niah.png", "summary.json", "summary.md"):
        assert (out / name).exists(), name
    rows = {row["mask"]: row for row in summary["runs"]}
    assert set(rows) == {None, "top:3", "random:3"} and all(row["points"] == 2 for row in rows.values())
    top = ["{}-{}".format(*h) for h in select_heads(scores, "top:3", num_layers=2, num_heads=4)]
    assert rows["top:3"]["masked_heads"] == top and rows[None]["masked_heads"] == []
    assert not set(rows["random:3"]["masked_heads"]) & set(top)
    manifest = json.loads((out / "needle" / "top_3" / "run.json").read_text())
    assert manifest["mask_mode"] == "uniform"
    # same config again: resumes (nothing re-run, same summary); another config: refused unless --overwrite
    assert run_needle_recipe(config, progress=False)["runs"] == summary["runs"]
    changed = _config(tmp_path, tiny_model_dir, mask_mode="zero")
    with pytest.raises(ValueError, match="another config"):
        run_needle_recipe(changed, progress=False)


def test_needle_recipe_config_is_strict():
    with pytest.raises(ValueError, match="needle.depth\\b"):
        load_config(NeedleRecipeConfig, values={"output_dir": "x", "needle": {"depth": [1]}})

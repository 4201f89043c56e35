"""The needle recipe (detect -> needle grid per mask -> plots) on a tiny random Llama: outputs, resume, refusal."""

from __future__ import annotations

import json

import pytest

from selective_attention.heads import load_head_scores, select_heads
from selective_attention.retrieval.languages import get_language
from selective_attention.recipes import (NEEDLE_ARGUMENTS, NeedleRecipeArguments, command_line, parse_config,
                                         run_needle_recipe)

from .test_recipes import ROOT, tiny_model_dir  # noqa: F401  (fixture)


def _config(tmp_path, model_dir, **values) -> NeedleRecipeArguments:
    settings = {"output_dir": str(tmp_path / "needle"), "model": str(model_dir),
                "detect_lengths": [60], "detect_depths": [50], "detect_max_new_tokens": 3,
                "lengths": [60], "depths": [20, 80], "max_new_tokens": 3,
                "rouge_threshold": -1.0,  # a random model never recalls the needle: count every trial
                "masks": [None, "top:3", "random:3"], "mask_mode": "uniform", "plot_top": 5}
    settings.update(values)
    (config,) = parse_config(NEEDLE_ARGUMENTS, ROOT / "recipes" / "configs" / "needle_cpu.yaml", values=settings)
    return config


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
    with pytest.raises(ValueError, match=r"unknown config key.*\bdepth\b.*did you mean depths"):
        parse_config(NEEDLE_ARGUMENTS, values={"output_dir": "x", "depth": [1]})
    with pytest.raises(ValueError, match="unknown score_against 'rouge'"):
        parse_config(NEEDLE_ARGUMENTS, values={"output_dir": "x", "score_against": "rouge"})
    with pytest.raises(ValueError, match="klingon"):
        parse_config(NEEDLE_ARGUMENTS, values={"output_dir": "x", "language": "klingon"})


def test_needle_recipe_passes_language_chat_and_scoring_options(tmp_path, tiny_model_dir):  # noqa: F811
    """The `needle` command's flags, derived for the recipe, reach detection and the needle grid."""
    (config,), _ = command_line(NEEDLE_ARGUMENTS, [
        "--output-dir", str(tmp_path / "de"),
        "--model", str(tiny_model_dir), "--language", "de", "--haystack-language", "en", "--no-chat",
        "--score-against", "answer", "--detect_lengths", "60", "--detect_depths", "50", "--detect_max_new_tokens",
        "3", "--lengths", "60", "--depths", "50", "--max_new_tokens", "3", "--masks", "none"])
    assert (config.language, config.haystack_language, config.chat, config.score_against) == ("de", "en", False,
                                                                                               "answer")
    summary = run_needle_recipe(config, progress=False)
    assert [row["mask"] for row in summary["runs"]] == [None]
    sidecar = json.loads((tmp_path / "de" / "head_scores.meta.json").read_text())
    assert (sidecar["language"], sidecar["haystack_language"]) == ("de", "en")
    assert sidecar["settings"]["chat"] is False
    manifest = json.loads((tmp_path / "de" / "needle" / "no_mask" / "run.json").read_text())
    assert manifest["settings"]["score_against"] == "answer" and manifest["settings"]["chat"] is False
    assert (manifest["language"], manifest["haystack_language"]) == ("de", "en")
    german = get_language("de").resolve_needles(None)[0]  # --needles unset: the language's first needle
    assert manifest["settings"]["needles"][0] == german.to_dict() and sidecar["settings"]["needles"][0] == german.to_dict()

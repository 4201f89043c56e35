"""`selective-attention reproduce`: the seeds' experiments, end to end, on one model, into one folder.

Steps (each resumable: a finished step is skipped on rerun, an interrupted one resumes where its own code can):
retrieval-head detection + NIAH with no / top-K / seeded random-K / bottom-K masks for each ablation mode,
MNLI-format LoRA fine-tuning of the original model and of GQA variants, accuracy vs masked heads, tree-kernel
perplexity, attention maps before/after masking the top retrieval heads. `index.md` embeds every figure;
`write_results_doc` turns the same outputs into docs/results.md beside the seeds' reported numbers.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, fields
from pathlib import Path

from selective_attention.attention.maps import attention_maps
from selective_attention.heads.masking import mask_heads
from selective_attention.heads.scores import load_head_scores
from selective_attention.heads.selection import rank_heads, select_heads
from selective_attention.loading import load_model
from selective_attention.plots import plot_layer, plot_map_comparison
from selective_attention.recipes import (
    FINETUNE_ARGUMENTS,
    MASKED_EVAL_ARGUMENTS,
    NEEDLE_ARGUMENTS,
    DataArguments,
    parse_config,
    run_finetune,
    run_masked_eval,
    run_needle_recipe,
)
from selective_attention.recipes.io import write_json, write_text
from selective_attention.reproduce.config import ReproduceConfig
from selective_attention.reproduce.report import render_report
from selective_attention.tree_kernel.perplexity import TreePplConfig, resume
from selective_attention.tree_kernel.perplexity import run_tree_ppl as run_tree_ppl_experiment

logger = logging.getLogger(__name__)


def _done(path: Path) -> bool:
    return path.exists()


def _timed(timings: dict, name: str, function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    timings[name] = round(time.perf_counter() - start, 1) + timings.get(name, 0.0)
    logger.info("step %s: %.1fs", name, timings[name])
    return result


def run_retrieval(config: ReproduceConfig, out: Path) -> list[dict]:
    k = config.top_k
    summaries = []
    scores_path = out / "retrieval" / "zero" / "head_scores.json"
    for index, mode in enumerate(config.mask_modes):
        masks = ([None] if index == 0 else []) + [f"top:{k}", f"random:{k}", f"bottom:{k}"]
        values = {**config.retrieval, "output_dir": str(out / "retrieval" / mode), "model": config.model,
                  "mask_mode": mode, "masks": masks, "seed": config.seed}
        if index > 0:
            values["head_scores"] = str(scores_path)
        else:
            scores_path = out / "retrieval" / mode / "head_scores.json"
        (needle_config,) = parse_config(NEEDLE_ARGUMENTS, values=values)
        summaries.append(run_needle_recipe(needle_config, progress=True))
    return summaries


def run_finetunes(config: ReproduceConfig, out: Path) -> dict[str, dict]:
    results = {}
    for variant in config.variants:
        name = variant["name"]
        run_dir = out / "finetune" / name
        if _done(run_dir / "metrics.json"):
            results[name] = json.loads((run_dir / "metrics.json").read_text())
            continue
        values = {**config.finetune, **{k: v for k, v in variant.items() if k != "name"},
                  "output_dir": str(run_dir), "model": config.model, "seed": config.seed}
        results[name] = run_finetune(*parse_config(FINETUNE_ARGUMENTS, values=values), overwrite=True)
    return results


def run_masked_evals(config: ReproduceConfig, out: Path) -> dict[str, dict]:
    results = {}
    original = out / "finetune" / config.variants[0]["name"]
    for order in config.masked_eval_orders:
        run_dir = out / "masked_eval" / order
        values = {**config.masked_eval, "output_dir": str(run_dir), "order": order, "seed": config.seed,
                  "head_scores": str(out / "retrieval" / config.mask_modes[0] / "head_scores.json"),
                  "model": str(original) if (original / "metrics.json").exists() else config.model}
        data_keys = {spec.name for spec in fields(DataArguments)}  # the fine-tuning run's subsets
        values = {**{k: v for k, v in config.finetune.items() if k in data_keys}, **values}
        model_args, data, sweep = parse_config(MASKED_EVAL_ARGUMENTS, values=values)
        saved = run_dir / "masked_eval.json"
        if saved.exists() and len(json.loads(saved.read_text())["rows"]) == len(sweep.counts):
            results[order] = json.loads(saved.read_text())
            continue
        results[order] = run_masked_eval(model_args, data, sweep, overwrite=True)
    return results


def run_tree_ppl(config: ReproduceConfig, out: Path) -> dict:
    tree_config = TreePplConfig(**{**config.tree_ppl, "output": str(out / "tree_ppl" / "tree_ppl")})
    resume(tree_config, config.model)  # an earlier run under other settings is refused before the model loads
    model, tokenizer = load_model(config.model)
    outcome = run_tree_ppl_experiment(model, tokenizer, tree_config, model_name=config.model)
    return dict(settings=outcome["settings"], results=outcome["results"])


def run_attention_maps(config: ReproduceConfig, out: Path) -> dict:
    """The top retrieval head on a needle sentence, before and after masking the top-K heads (uniform)."""
    scores = load_head_scores(out / "retrieval" / config.mask_modes[0] / "head_scores.json")
    (layer, head), score = rank_heads(scores)[0]
    model, tokenizer = load_model(config.model)
    text = config.attention_map_text or (
        "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day. "
        "Question: What is the best thing to do in San Francisco? Answer: The best thing to do in San Francisco is")
    target = out / "attention_map"
    before, tokens = attention_maps(model, tokenizer, text, [layer])
    heads = select_heads(scores, f"top:{config.top_k}")
    with mask_heads(model, heads, mode="uniform"):
        after, _ = attention_maps(model, tokenizer, text, [layer])
    plot_layer(before, tokens, layer, target / f"layer{layer}.png")
    plot_map_comparison(before, after, tokens, layer, head, target / f"compare_layer{layer}_head{head}.png",
                    ("unmasked", f"top-{config.top_k} masked (uniform)"))
    summary = {"layer": layer, "head": head, "score": score, "tokens": len(tokens),
               "figures": [f"layer{layer}.png", f"compare_layer{layer}_head{head}.png"]}
    write_json(target / "summary.json", summary)
    return summary


def reproduce(config: ReproduceConfig) -> Path:
    """Run the configured steps into `config.output_dir`, then write `index.md`; returns the index path."""
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", asdict(config))
    timings_path = out / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    started = time.perf_counter()
    runners = {"retrieval": run_retrieval, "finetune": run_finetunes, "masked_eval": run_masked_evals,
               "tree_ppl": run_tree_ppl, "attention_map": run_attention_maps}
    for step in config.steps:
        logger.info("=== %s ===", step)
        _timed(timings, step, runners[step], config, out)
        write_json(timings_path, timings)
    timings["total_this_run"] = round(time.perf_counter() - started, 1)
    write_json(timings_path, timings)
    index = out / "index.md"
    write_text(index, render_report(out, image_prefix=""))
    return index

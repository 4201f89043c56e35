"""Needle-in-a-haystack grid through the head-wise KV cache on the embedded SmolLM2, four ways:

dense (DynamicCache); head-wise with the top retrieval KV heads full (shipped SmolLM2 scores, or --scores);
head-wise with as many seeded random KV heads full; every KV head streaming (sink + window only); and the top half
of the KV heads full (DuoAttention's setting for GQA models). One folder of point files per
run (resumable), then a summary (JSON + Markdown table) and side-by-side heatmaps.

Run names beyond those: `<select>_<options>` with select top | random | streaming and options separated by `_`:
a count or fraction of full KV heads (`23`, `0.5`), `w<N>` (window), `s<N>` (sink), `x<key>` (the score file named
`key` in --score-files instead of --scores), `seed<N>` (selection seed), `dp` (dense prefill, then trim:
the prompt runs through the dense model and the cache is trimmed before the answer; the default is DuoAttention's
streaming prefill, in which the streaming heads attend to sink + window at prefill too). E.g. `top_45_w512_dp`.

    python benchmarks/headwise_needle.py [--lengths 2000,4000,8000] [--depths 0,50,100] [--full 0.25]
    python benchmarks/headwise_needle.py --scores docs/results/headwise/smollm2_head_scores_large.json \
        --output benchmarks/results/headwise_needle_large --reuse benchmarks/results/headwise_needle \
        --runs top,top_45,top_23_dp
    python benchmarks/headwise_needle.py --report-only      # table and heatmaps from the files already there
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import re
import statistics
import time
from importlib import resources
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "headwise_needle"
DOCS_FIGURE = ROOT / "docs" / "images" / "headwise_kv_niah.png"
logger = logging.getLogger("headwise_needle")


#: The cells that test retrieval from the middle of a context dense SmolLM2 still answers: depth 0 sits in the sink
#: and depth 100 in the window (every configuration answers there), and at 8000 tokens dense itself fails.
CORE = dict(lengths=(2000, 4000), depths=(25.0, 50.0, 75.0))


def runs(full: str) -> dict[str, dict]:
    """Run name -> NeedleConfig settings (beyond the grid), for the named runs."""
    return {"dense": dict(kv_cache="dynamic"),
            "top": dict(kv_cache="headwise", full_kv_heads=full, kv_select="top"),
            "random": dict(kv_cache="headwise", full_kv_heads=full, kv_select="random"),
            "streaming": dict(kv_cache="headwise", full_kv_heads="0", kv_select="top"),
            "top-half": dict(kv_cache="headwise", full_kv_heads="0.5", kv_select="top")}


def run_settings(name: str, full: str) -> dict:
    """Settings of a named run or of `<select>_<options>` (see the module docstring); `dense_prefill` and
    `window`/`sink` when given are extra keys."""
    named = runs(full)
    if name in named:
        return dict(named[name])
    select, *options = name.split("_")
    if select not in ("top", "random", "streaming"):
        raise ValueError(f"unknown run {name!r}")
    settings = dict(kv_cache="headwise", kv_select="top" if select == "streaming" else select,
                    full_kv_heads="0" if select == "streaming" else full)
    for option in options:
        if option == "dp":
            settings["dense_prefill"] = True
        elif option.startswith("x") and len(option) > 1:
            settings["scores_key"] = option[1:]
        elif re.fullmatch(r"seed\d+", option):
            settings["seed"] = int(option[4:])
        elif re.fullmatch(r"[ws]\d+", option):
            settings["window" if option[0] == "w" else "sink"] = int(option[1:])
        elif re.fullmatch(r"\d+(\.\d+)?", option) and select != "streaming":
            settings["full_kv_heads"] = option
        else:
            raise ValueError(f"unknown option {option!r} in run {name!r}")
    return settings


@contextlib.contextmanager
def dense_prefill_patch(enabled: bool):
    """Inside: the needle grid prefills densely (shared prefix and prompt) and trims the cache before the answer."""
    if not enabled:
        yield
        return
    from selective_attention.cache.headwise import dense_attention, trial_cache
    from selective_attention.retrieval import evaluate

    class DensePrefix(evaluate.SharedPrefix):
        def __init__(self, model, prompts) -> None:
            with dense_attention(model):
                super().__init__(model, prompts)

    saved = evaluate.SharedPrefix, evaluate.trial_cache
    evaluate.SharedPrefix = DensePrefix
    evaluate.trial_cache = functools.partial(trial_cache, dense_prefill=True)
    try:
        yield
    finally:
        evaluate.SharedPrefix, evaluate.trial_cache = saved


def run_grid(args: argparse.Namespace) -> None:
    from selective_attention.heads import EMBEDDED_MODEL_SCORES
    from selective_attention.loading import load_model
    from selective_attention.retrieval.evaluate import (
        MANIFEST,
        NeedleConfig,
        run_needle_grid,
    )
    from selective_attention.retrieval.needles import resolve_needles

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model()
    scores = args.scores or str(resources.files("selective_attention").joinpath(EMBEDDED_MODEL_SCORES))
    for name in args.runs:
        settings = run_settings(name, args.full)
        dense_prefill = settings.pop("dense_prefill", False)
        run_scores = args.score_files[settings.pop("scores_key")] if "scores_key" in settings else scores
        settings = {"sink": args.sink, "window": args.window, "seed": args.seed, **settings}
        started = time.perf_counter()
        config = NeedleConfig(lengths=args.lengths, depths=args.depths, needles=resolve_needles(args.needles),
                              head_scores=run_scores, **settings)
        with dense_prefill_patch(dense_prefill):
            results = run_needle_grid(model, tokenizer, config, args.output / name, model_name="SmolLM2-135M-Instruct",
                                      label=f"{name} (dense prefill, then trim)" if dense_prefill else None)
        if dense_prefill:  # the manifest's kv_cache is the policy's; say how the prompt was prefilled
            path = args.output / name / MANIFEST
            manifest = json.loads(path.read_text(encoding="utf-8"))
            manifest["prefill"] = "dense, then trim"
            path.write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        logger.info("%s: %d points, mean %.1f, %.0f s", name, len(results),
                    statistics.mean(r["score"] for r in results), time.perf_counter() - started)


def _folders(args: argparse.Namespace) -> list[tuple[str, Path]]:
    """(run, folder) for every run in --output, then the --reuse runs not in --output (scores-independent)."""
    found = {p.name: p for p in sorted(args.output.iterdir()) if p.is_dir()} if args.output.is_dir() else {}
    for name in ("dense", "random", "streaming") if args.reuse else ():
        if name not in found and (args.reuse / name).is_dir():
            found[name] = args.reuse / name
    order = list(runs(args.full))
    return sorted(found.items(), key=lambda item: (order.index(item[0]) if item[0] in order else len(order), item[0]))


def report(args: argparse.Namespace) -> dict:
    from selective_attention.plots import plot_niah
    from selective_attention.retrieval.evaluate import load_manifest, load_results

    summary, plotted = {"runs": []}, []
    for name, folder in _folders(args):
        results, manifest = load_results(folder), load_manifest(folder)
        if not results:
            continue
        by_length = {}
        for result in results:
            by_length.setdefault(result["context_length"], []).append(result["score"])
        core = [r["score"] for r in results
                if r["context_length"] in CORE["lengths"] and r["depth_percent"] in CORE["depths"]]
        kv = manifest.get("kv_cache") or {}
        summary["runs"].append({
            "run": name, "folder": str(folder.relative_to(ROOT)) if folder.is_relative_to(ROOT) else str(folder),
            "label": manifest.get("label"), "points": len(results),
            "head_scores": Path(manifest["head_scores"]).name if kv and manifest.get("head_scores") else None,
            "prefill": manifest.get("prefill", "streaming" if kv else "dense"),
            "mean": statistics.mean(r["score"] for r in results),
            "core": statistics.mean(core) if len(core) == 6 else None,
            "core_answered": sum(score > 70 for score in core) if len(core) == 6 else None,
            "by_length": {str(k): statistics.mean(v) for k, v in sorted(by_length.items())},
            "full_kv_heads": sum(map(sum, kv["pattern"])) if kv else None, "sink": kv.get("sink"),
            "window": kv.get("window"), "seconds": sum(r["test_duration_seconds"] for r in results)})
        if args.plot_runs is None or name in args.plot_runs:
            full = (f"{sum(map(sum, kv['pattern']))}/{sum(map(len, kv['pattern']))} full, w{kv['window']}"
                    if kv else "DynamicCache")
            plotted.append((f"{name}: {full}", results))
    dense = next((r for r in summary["runs"] if r["run"] == "dense"), None)
    for row in summary["runs"]:
        same_grid = dense is not None and row["points"] == dense["points"]
        row["vs_dense"] = row["mean"] - dense["mean"] if same_grid else None
        row["core_vs_dense"] = (row["core"] - dense["core"]) if dense and row["core"] is not None else None
    (args.output / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    (args.output / "summary.md").write_text(markdown(summary), encoding="utf-8")
    if plotted:
        plot_niah(plotted, args.figure, title=f"SmolLM2-135M: needle retrieval through a head-wise KV cache "
                                              f"(streaming heads: sink {args.sink} + window {args.window})")
    print(markdown(summary))
    return summary


def markdown(summary: dict) -> str:
    lengths = sorted({int(k) for row in summary["runs"] for k in row["by_length"]})
    lines = ["| run | KV heads full | window | prefill | " + " | ".join(f"{n} tokens" for n in lengths)
             + " | mean | vs dense | core (2000-4000, depths 25-75) | core answered | core vs dense |",
             "|---|---|---|---|" + "---|" * len(lengths) + "---|---|---|---|---|"]
    for row in summary["runs"]:
        full = "90/90" if row["full_kv_heads"] is None else f"{row['full_kv_heads']}/90"
        cells = " | ".join(f"{row['by_length'][str(n)]:.1f}" if str(n) in row["by_length"] else "-" for n in lengths)
        delta = "" if row["vs_dense"] is None else f"{row['vs_dense']:+.1f}"
        mean = f"{row['mean']:.1f}" + ("" if row["vs_dense"] is not None or row["run"] == "dense"
                                       else f" ({row['points']} points)")
        core = "-" if row["core"] is None else f"{row['core']:.1f}"
        answered = "-" if row["core_answered"] is None else f"{row['core_answered']}/6"
        core_delta = "" if row["core_vs_dense"] is None or row["run"] == "dense" else f"{row['core_vs_dense']:+.1f}"
        lines.append(f"| {row['run']} | {full} | {row['window'] or '-'} | {row['prefill']} | {cells} | {mean} | "
                     f"{delta} | {core} | {answered} | {core_delta} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="2000,4000,8000")
    parser.add_argument("--depths", default="0,50,100")
    parser.add_argument("--needles", default="sf")
    parser.add_argument("--full", default="0.25", help="KV heads kept full: fraction or count")
    parser.add_argument("--sink", type=int, default=64)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--figure", type=Path, default=DOCS_FIGURE)
    parser.add_argument("--runs", default=",".join(runs("0.25")), help="which runs, in this order")
    parser.add_argument("--scores", help="head-score file for the top runs (default: the shipped SmolLM2 scores)")
    parser.add_argument("--score-files", default="", help="key=path,... for runs with an x<key> option")
    parser.add_argument("--reuse", type=Path, help="results folder whose dense / random / streaming runs (which do "
                        "not depend on the scores) the report takes when --output has none")
    parser.add_argument("--plot-runs", help="runs to draw in the heatmaps (default: all)")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    args.lengths = [int(v) for v in args.lengths.split(",")]
    args.depths = [float(v) for v in args.depths.split(",")]
    args.runs = args.runs.split(",")
    args.plot_runs = args.plot_runs.split(",") if args.plot_runs else None
    args.score_files = dict(item.split("=", 1) for item in args.score_files.split(",") if item)
    for name in args.runs:
        try:
            key = run_settings(name, args.full).get("scores_key")
            if key is not None and key not in args.score_files:
                raise ValueError(f"run {name!r} needs --score-files {key}=PATH")
        except ValueError as error:
            parser.error(f"{error}; expected some of {sorted(runs(args.full))} or <select>_<options>")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if not args.report_only:
        run_grid(args)
    report(args)


if __name__ == "__main__":
    main()

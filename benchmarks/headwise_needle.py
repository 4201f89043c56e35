"""Needle-in-a-haystack grid through the head-wise KV cache on the embedded SmolLM2, four ways:

dense (DynamicCache); head-wise with the top retrieval KV heads full (shipped SmolLM2 scores); head-wise with as
many seeded random KV heads full; every KV head streaming (sink + window only); and the top half of the KV heads
full (DuoAttention's setting for GQA models). One folder of point files per
run (resumable), then a summary (JSON + Markdown table) and side-by-side heatmaps.

    python benchmarks/headwise_needle.py [--lengths 2000,4000,8000] [--depths 0,50,100] [--full 0.25]
    python benchmarks/headwise_needle.py --report-only      # table and heatmaps from the files already there
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from importlib import resources
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "headwise_needle"
DOCS_FIGURE = ROOT / "docs" / "images" / "headwise_kv_niah.png"
logger = logging.getLogger("headwise_needle")


def runs(full: str) -> dict[str, dict]:
    """Run name -> NeedleConfig settings (beyond the grid)."""
    return {"dense": dict(kv_cache="dynamic"),
            "top": dict(kv_cache="headwise", full_kv_heads=full, kv_select="top"),
            "random": dict(kv_cache="headwise", full_kv_heads=full, kv_select="random"),
            "streaming": dict(kv_cache="headwise", full_kv_heads="0", kv_select="top"),
            "top-half": dict(kv_cache="headwise", full_kv_heads="0.5", kv_select="top")}


def run_grid(args: argparse.Namespace) -> None:
    from selective_attention.heads import EMBEDDED_MODEL_SCORES
    from selective_attention.loading.loader import load_model
    from selective_attention.retrieval.evaluate import NeedleConfig, run_needle_grid
    from selective_attention.retrieval.needles import resolve_needles

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model()
    scores = str(resources.files("selective_attention").joinpath(EMBEDDED_MODEL_SCORES))
    for name in args.runs:
        settings = runs(args.full)[name]
        started = time.perf_counter()
        config = NeedleConfig(lengths=args.lengths, depths=args.depths, needles=resolve_needles(args.needles),
                              head_scores=scores, seed=args.seed, sink=args.sink, window=args.window, **settings)
        results = run_needle_grid(model, tokenizer, config, args.output / name, model_name="SmolLM2-135M-Instruct")
        logger.info("%s: %d points, mean %.1f, %.0f s", name, len(results),
                    statistics.mean(r["score"] for r in results), time.perf_counter() - started)


def report(args: argparse.Namespace) -> dict:
    from selective_attention.retrieval.evaluate import load_manifest, load_results
    from selective_attention.plots import plot_niah

    summary, plotted = {"runs": []}, []
    for name in runs(args.full):
        folder = args.output / name
        if not folder.is_dir():
            continue
        results, manifest = load_results(folder), load_manifest(folder)
        by_length = {}
        for result in results:
            by_length.setdefault(result["context_length"], []).append(result["score"])
        kv = manifest.get("kv_cache") or {}
        summary["runs"].append({
            "run": name, "label": manifest.get("label"), "points": len(results),
            "mean": statistics.mean(r["score"] for r in results),
            "by_length": {str(k): statistics.mean(v) for k, v in sorted(by_length.items())},
            "full_kv_heads": sum(map(sum, kv["pattern"])) if kv else None, "sink": kv.get("sink"),
            "window": kv.get("window"), "seconds": sum(r["test_duration_seconds"] for r in results)})
        full = f"{sum(map(sum, kv['pattern']))}/{sum(map(len, kv['pattern']))} KV heads full" if kv else "DynamicCache"
        plotted.append((f"{name}: {full}", results))
    dense = next((r["mean"] for r in summary["runs"] if r["run"] == "dense"), None)
    for row in summary["runs"]:
        row["vs_dense"] = None if dense is None else row["mean"] - dense
    (args.output / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    (args.output / "summary.md").write_text(markdown(summary), encoding="utf-8")
    if plotted:
        plot_niah(plotted, args.figure, title=f"SmolLM2-135M: needle retrieval through a head-wise KV cache "
                                              f"(streaming heads: sink {args.sink} + window {args.window})")
    print(markdown(summary))
    return summary


def markdown(summary: dict) -> str:
    lengths = sorted({int(k) for row in summary["runs"] for k in row["by_length"]})
    lines = ["| run | KV heads full | " + " | ".join(f"{n} tokens" for n in lengths) + " | mean | vs dense |",
             "|---|---|" + "---|" * len(lengths) + "---|---|"]
    for row in summary["runs"]:
        full = "90/90" if row["full_kv_heads"] is None else f"{row['full_kv_heads']}/90"
        cells = " | ".join(f"{row['by_length'].get(str(n), float('nan')):.1f}" for n in lengths)
        delta = "" if row["vs_dense"] is None else f"{row['vs_dense']:+.1f}"
        lines.append(f"| {row['run']} | {full} | {cells} | {row['mean']:.1f} | {delta} |")
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
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    args.lengths = [int(v) for v in args.lengths.split(",")]
    args.depths = [float(v) for v in args.depths.split(",")]
    args.runs = args.runs.split(",")
    unknown = set(args.runs) - set(runs(args.full))
    if unknown:
        parser.error(f"unknown runs {sorted(unknown)}; expected some of {sorted(runs(args.full))}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if not args.report_only:
        run_grid(args)
    report(args)


if __name__ == "__main__":
    main()

"""`selective-attention plot`: NIAH heatmaps, head-score heatmap, top-k retrieval heads."""

from __future__ import annotations

import argparse
from pathlib import Path

from selective_attention.heads.scores import load_head_scores, load_sidecar
from selective_attention.plots import plot_head_scores, plot_niah, plot_top_heads
from selective_attention.retrieval.evaluate import load_manifest, load_results


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("plot", help="plot needle grids and head scores (PNG)")
    kinds = parser.add_subparsers(dest="kind", metavar="KIND", required=True)

    niah = kinds.add_parser("niah", help="needle-in-a-haystack heatmaps, one per results folder, side by side")
    niah.add_argument("runs", nargs="+", type=Path, help="results folders of `selective-attention needle`")
    niah.add_argument("--labels", default=None, help="comma-separated labels (default: each run's own label)")
    niah.add_argument("--title", default=None)
    niah.add_argument("--output", type=Path, default=Path("niah.png"))
    niah.set_defaults(func=run_niah)

    heads = kinds.add_parser("heads", help="layer x head heatmap of a head-score file")
    heads.add_argument("scores", type=Path, help="head_scores.json")
    heads.add_argument("--title", default=None)
    heads.add_argument("--output", type=Path, default=Path("head_scores.png"))
    heads.set_defaults(func=run_heads)

    top = kinds.add_parser("top", help="bar chart of the top-k retrieval heads")
    top.add_argument("scores", type=Path, help="head_scores.json")
    top.add_argument("-k", type=int, default=20)
    top.add_argument("--title", default=None)
    top.add_argument("--output", type=Path, default=Path("top_heads.png"))
    top.set_defaults(func=run_top)


def run_niah(args: argparse.Namespace) -> int:
    labels = args.labels.split(",") if args.labels else None
    if labels is not None and len(labels) != len(args.runs):
        raise ValueError(f"{len(labels)} labels for {len(args.runs)} runs")
    runs = []
    for i, folder in enumerate(args.runs):
        label = labels[i] if labels else load_manifest(folder).get("label") or folder.name
        runs.append((label, load_results(folder)))
    print(plot_niah(runs, args.output, title=args.title))
    return 0


def _scores(path: Path):
    meta = load_sidecar(path) or {}
    return load_head_scores(path), meta


def run_heads(args: argparse.Namespace) -> int:
    scores, meta = _scores(args.scores)
    title = args.title or f"retrieval scores, {meta.get('model', args.scores.name)}"
    print(plot_head_scores(scores, args.output, title=title, num_layers=meta.get("num_layers"),
                           num_heads=meta.get("num_heads")))
    return 0


def run_top(args: argparse.Namespace) -> int:
    if args.k < 1:
        raise ValueError("-k must be at least 1")
    scores, meta = _scores(args.scores)
    print(plot_top_heads(scores, args.output, k=args.k, title=args.title))
    return 0

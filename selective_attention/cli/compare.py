"""`selective-attention compare`: two head-score files side by side (scatter, top-K overlap, rank correlation)."""

from __future__ import annotations

import argparse
from pathlib import Path

from selective_attention.heads.compare import compare_head_scores, write_comparison
from selective_attention.plots import plot_score_comparison


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("compare", help="compare two head-score files (e.g. en-en vs en-zh detection)")
    parser.add_argument("a", type=Path, help="first head_scores.json (x axis)")
    parser.add_argument("b", type=Path, help="second head_scores.json (y axis)")
    parser.add_argument("-k", type=int, default=20, help="size of the top-K sets whose overlap is reported")
    parser.add_argument("--labels", default=None, help="two comma-separated labels (default: from the sidecars)")
    parser.add_argument("--title", default=None)
    parser.add_argument("--output", type=Path, default=Path("compare.png"), help="scatter plot (PNG)")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    labels = None
    if args.labels:
        labels = tuple(part.strip() for part in args.labels.split(","))
        if len(labels) != 2:
            raise ValueError(f"--labels needs two comma-separated labels, got {args.labels!r}")
    comparison = compare_head_scores(args.a, args.b, k=args.k, labels=labels)
    plot_score_comparison(comparison, args.output, title=args.title)
    if args.json:
        write_comparison(comparison, args.json)
    data = comparison.to_dict()
    print(f"A: {comparison.labels[0]} ({data['heads_scoring_a']} heads score > 0)")
    print(f"B: {comparison.labels[1]} ({data['heads_scoring_b']} heads score > 0)")
    print(f"top-{args.k} overlap: {data['overlap_count']} heads {', '.join(data['overlap']) or '-'}"
          + (f" (Jaccard {data['jaccard']:.2f})" if data["jaccard"] is not None else ""))
    if data["spearman"] is not None:
        print(f"Spearman {data['spearman']:.3f}, Pearson {data['pearson']:.3f}")
    print(f"plot: {args.output}")
    return 0

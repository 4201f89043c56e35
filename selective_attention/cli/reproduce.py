"""`selective-attention reproduce`: every seed experiment on one model, one output folder, one index.md."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from selective_attention.reproduce import STEPS, load_reproduce_config, reproduce, write_results_doc


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("reproduce", help="run the seeds' experiments end to end (see recipes/reproduce.yaml)")
    parser.add_argument("--config", type=Path, default=None, help="YAML (default: built-in small CPU settings)")
    parser.add_argument("--output", default=None, help="run folder (default: the config's output_dir)")
    parser.add_argument("--output-dir", dest="output", help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None)
    parser.add_argument("--steps", nargs="+", default=None, choices=STEPS)
    parser.add_argument("--write-docs", type=Path, default=None, help="also write DIR/results.md and DIR/images/")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    overrides = {key: value for key, value in (("output_dir", args.output), ("model", args.model),
                                               ("steps", args.steps)) if value is not None}
    config = load_reproduce_config(args.config, overrides)
    start = time.perf_counter()
    index = reproduce(config)
    print(f"index: {index}")
    if args.write_docs:
        print(f"docs: {write_results_doc(index.parent, args.write_docs)}")
    print(f"wall time: {(time.perf_counter() - start) / 60:.1f} min")
    return 0

"""`selective-attention needle`: needle-in-a-haystack grid, optionally with retrieval heads masked.

`accelerate launch -m selective_attention.cli needle ...` splits the points over the processes."""

from __future__ import annotations

import argparse
from pathlib import Path

from selective_attention.cli.arguments import (
    add_config_arguments,
    add_model_arguments,
    add_output_argument,
    config_from_args,
    model_kwargs,
)
from selective_attention.distributed.sharding import current_shard
from selective_attention.heads.scores import headwise_scores_path
from selective_attention.loading import assets
from selective_attention.loading.loader import load_model
from selective_attention.loading.quantization import add_quantize_argument
from selective_attention.plots import plot_niah
from selective_attention.retrieval.config import KV_CACHE_FIELDS, NeedleConfig
from selective_attention.retrieval.evaluate import load_manifest, run_needle_grid
from selective_attention.retrieval.languages import get_language
from selective_attention.retrieval.tracking import add_tracking_arguments, check_backend, tracker_from_args


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("needle", help="needle-in-a-haystack grid with optional head masks")
    add_model_arguments(parser, placement=True)
    add_config_arguments(parser, NeedleConfig, skip=("reuse_prefix", *KV_CACHE_FIELDS))
    add_quantize_argument(parser)
    add_tracking_arguments(parser)
    add_output_argument(parser, "folder: one JSON per test point (LLMTest_NeedleInAHaystack layout); existing "
                                "points are kept")
    parser.add_argument("--label", default=None, help="name of this run in plots")
    add_config_arguments(parser, NeedleConfig, only=KV_CACHE_FIELDS)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(NeedleConfig, args, needles=get_language(args.language).resolve_needles(args.needles),
                              head_scores=args.head_scores if args.kv_cache != "headwise" else
                              headwise_scores_path(args.head_scores, args.model))
    if args.head_scores and not Path(args.head_scores).exists():
        raise FileNotFoundError(f"head-score file {args.head_scores} does not exist")

    check_backend(args.report_to)
    shard = current_shard()
    model, tokenizer = load_model(**model_kwargs(args, shard))
    if not shard.is_main:  # the main process reports; the others only run their points
        run_needle_grid(model, tokenizer, config, args.output, model_name=args.model or assets.MODEL_NAME,
                        label=args.label, shard=shard)
        return 0
    with tracker_from_args(args) as tracker:
        results = run_needle_grid(model, tokenizer, config, args.output,
                                  model_name=args.model or assets.MODEL_NAME, label=args.label, tracker=tracker,
                                  shard=shard)
        if args.report_to != "none" and results:
            label = load_manifest(args.output).get("label") or args.label or "needle"
            tracker.log_image("niah", plot_niah([(label, results)], Path(args.output) / "niah.png"))
    mean = sum(r["score"] for r in results) / max(len(results), 1)
    print(f"{len(results)} points in {args.output}, mean score {mean:.1f}")
    return 0

"""`selective-attention detect`: retrieval-head scores over a needle grid (head_scores.json + sidecar).

`accelerate launch -m selective_attention.cli detect ...` splits the trials over the processes (see
`selective_attention.distributed.sharding`)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from selective_attention.cli.arguments import add_config_arguments, add_model_arguments, config_from_args, model_kwargs
from selective_attention.distributed.sharding import current_shard
from selective_attention.heads.duo import duo_pattern, write_duo_pattern
from selective_attention.heads.selection import rank_heads
from selective_attention.loading import assets
from selective_attention.loading.loader import load_model
from selective_attention.loading.quantization import add_quantize_argument
from selective_attention.plots import plot_head_scores
from selective_attention.retrieval.config import DetectConfig
from selective_attention.retrieval.detect import detect
from selective_attention.retrieval.languages import get_language
from selective_attention.retrieval.tracking import add_tracking_arguments, check_backend, tracker_from_args

logger = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("detect", help="score retrieval heads on a needle-in-a-haystack grid")
    add_model_arguments(parser, placement=True)
    add_config_arguments(parser, DetectConfig)
    add_quantize_argument(parser)
    add_tracking_arguments(parser)
    parser.add_argument("--output", type=Path, default=Path("head_scores.json"),
                        help="head-score file; an existing one is resumed/merged (sidecar: *.meta.json)")
    parser.add_argument("--top", type=int, default=10, help="print this many top heads at the end")
    parser.add_argument("--export-duo", type=Path, default=None,
                        help="also write the top heads (--duo-top) as a DuoAttention pattern directory "
                             "(full_attention_heads.tsv + config.json), or as one TSV for a path ending in .tsv")
    parser.add_argument("--duo-top", type=int, default=20, help="number of retrieval heads for --export-duo")
    parser.add_argument("--duo-sink", type=int, default=64, help="sink_size written to the DuoAttention config.json")
    parser.add_argument("--duo-recent", type=int, default=256,
                        help="recent_size written to the DuoAttention config.json")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(DetectConfig, args, needles=get_language(args.language).resolve_needles(args.needles))
    check_backend(args.report_to)
    shard = current_shard()
    model, tokenizer = load_model(**model_kwargs(args, shard))
    if not shard.is_main:  # the main process reports; the others only run their trials
        detect(model, tokenizer, config, args.output, model_name=args.model or assets.MODEL_NAME, shard=shard)
        return 0
    with tracker_from_args(args) as tracker:
        result = detect(model, tokenizer, config, args.output, model_name=args.model or assets.MODEL_NAME,
                        tracker=tracker, shard=shard)
        if args.report_to != "none":
            meta = result.meta
            image = plot_head_scores(result.scores, Path(args.output).with_suffix(".png"),
                                     title=f"retrieval scores, {meta['model']} ({config.language} needle, "
                                           f"{config.haystack_language} haystack)",
                                     num_layers=meta["num_layers"], num_heads=meta["num_heads"])
            tracker.log_image("head_scores", image)
    counted = result.meta["counted_trials"]
    print(f"{result.new_trials} new trials ({len(result.meta['trials'])} in {args.output}, {counted} counted) "
          f"in {result.seconds:.1f}s")
    for (layer, head), score in rank_heads(result.scores)[: args.top]:
        print(f"  {layer}-{head}: {score:.3f}")
    if args.export_duo:
        meta = result.meta
        pattern = duo_pattern(result.scores, meta["num_layers"], meta["num_heads"], meta["num_key_value_heads"],
                              args.duo_top)
        print(f"DuoAttention pattern of the top {args.duo_top} heads: {write_duo_pattern(args.export_duo, pattern, args.duo_sink, args.duo_recent)}")
    return 0

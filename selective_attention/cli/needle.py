"""`selective-attention needle`: needle-in-a-haystack grid, optionally with retrieval heads masked.

`accelerate launch -m selective_attention.cli needle ...` splits the points over the processes."""

from __future__ import annotations

import argparse
from pathlib import Path

from selective_attention.cli.arguments import add_model_arguments, add_output_argument, model_kwargs
from selective_attention.cli.detect import add_grid_arguments
from selective_attention.distributed.sharding import current_shard
from selective_attention.heads.scores import EMBEDDED_MODEL_SCORES
from selective_attention.loading import assets
from selective_attention.loading.loader import load_model
from selective_attention.plots import plot_niah
from selective_attention.retrieval.evaluate import NeedleConfig, load_manifest, run_needle_grid
from selective_attention.retrieval.languages import get_language
from selective_attention.retrieval.tracking import check_backend, tracker_from_args


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("needle", help="needle-in-a-haystack grid with optional head masks")
    add_model_arguments(parser, placement=True)
    add_grid_arguments(parser, lengths="1000,2000", depths="0:100:25")
    add_output_argument(parser, "folder: one JSON per test point (LLMTest_NeedleInAHaystack layout); existing "
                                "points are kept")
    parser.add_argument("--mask", default=None,
                        help="heads to mask: top:K, bottom:K, random:K (seeded, never a top-K head) or 'L-H,L-H'")
    parser.add_argument("--seed", type=int, default=0, help="seed of random:K")
    parser.add_argument("--mask-mode", default="zero", choices=["zero", "uniform", "mean"])
    parser.add_argument("--head-scores", default=None, help="head_scores.json from `selective-attention detect`")
    parser.add_argument("--score-against", default="needle", choices=["needle", "answer"],
                        help="ROUGE-1 recall of the needle sentence (reference) or of the expected answer")
    parser.add_argument("--label", default=None, help="name of this run in plots")
    add_kv_cache_arguments(parser)
    parser.set_defaults(func=run)


def add_kv_cache_arguments(parser: argparse.ArgumentParser) -> None:
    """--kv-cache/--full-kv-heads/--kv-select/--sink/--window/--prefill-chunk, shared by needle and demo."""
    parser.add_argument("--kv-cache", default="dynamic", choices=["dynamic", "headwise"],
                        help="headwise: retrieval KV heads keep the whole context, the others sink + window")
    parser.add_argument("--full-kv-heads", default="0.25",
                        help="head-wise: KV heads kept full, a count (23) or a fraction of all KV heads (0.25)")
    parser.add_argument("--kv-select", default="top", choices=["top", "random"],
                        help="head-wise: top retrieval KV heads (--head-scores) or seeded random ones (--seed)")
    parser.add_argument("--sink", type=int, default=64, help="head-wise: first positions every head keeps")
    parser.add_argument("--window", type=int, default=256, help="head-wise: recent positions streaming heads keep")
    parser.add_argument("--prefill-chunk", type=int, default=None,
                        help="head-wise: prefill in chunks of this many tokens (lower peak memory)")


def kv_head_scores_path(args: argparse.Namespace) -> str | None:
    """--head-scores, or for a head-wise cache on the embedded model the scores shipped with the package."""
    if args.head_scores or args.kv_cache != "headwise" or args.model is not None:
        return args.head_scores
    from importlib import resources


    return str(resources.files("selective_attention").joinpath(EMBEDDED_MODEL_SCORES))


def run(args: argparse.Namespace) -> int:
    config = NeedleConfig(lengths=args.lengths, depths=args.depths,
                          needles=get_language(args.language).resolve_needles(args.needles),
                          mask=args.mask, seed=args.seed, mask_mode=args.mask_mode,
                          head_scores=kv_head_scores_path(args),
                          max_new_tokens=args.max_new_tokens, haystack=args.haystack,
                          chat=False if args.no_chat else None, score_against=args.score_against,
                          language=args.language, haystack_language=args.haystack_language,
                          kv_cache=args.kv_cache, full_kv_heads=args.full_kv_heads, kv_select=args.kv_select,
                          sink=args.sink, window=args.window, prefill_chunk=args.prefill_chunk)
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

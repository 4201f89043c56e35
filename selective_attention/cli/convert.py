"""`selective-attention convert`: a Llama-family checkpoint -> selective_llama with chosen KV heads per layer."""

from __future__ import annotations

import argparse

from selective_attention.cache.headwise import parse_full
from selective_attention.cli.arguments import add_output_argument
from selective_attention.gqa.convert import convert_model
from selective_attention.loading.loader import resolve_dtype


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("convert", help="change the number of KV heads per layer (variable-group GQA)")
    parser.add_argument("--model", default=None, help="HF model id, local dir or .gguf file (default: embedded SmolLM2)")
    parser.add_argument("--kv-heads", required=True,
                        help="'9' (every layer), 'N,N,...' (one per layer) or overrides like '15:16,14:1' / 'all:1'")
    parser.add_argument("--method", default="duplicate", choices=["duplicate", "mean", "similarity"],
                        help="how to lower KV heads (layers that gain heads are always duplicated, exactly)")
    add_output_argument(parser, "output checkpoint folder", type=str)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output folder")
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    parser.add_argument("--calibration-file", action="append", default=None,
                        help="text file(s) for similarity/error calibration (default: the haystack essays)")
    parser.add_argument("--calibration-tokens", type=int, default=512)
    parser.add_argument("--headwise-full", default=None,
                        help="write a head-wise KV pattern into the checkpoint: KV heads kept full, a count (23) or a "
                             "fraction (0.25); the others keep --sink + --window positions when generating")
    parser.add_argument("--head-scores", default=None, help="head_scores.json choosing the full KV heads")
    parser.add_argument("--sink", type=int, default=64)
    parser.add_argument("--window", type=int, default=256)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path


    texts = None
    if args.calibration_file:
        missing = [name for name in args.calibration_file if not Path(name).is_file()]
        if missing:
            raise FileNotFoundError(f"calibration file(s) not found: {', '.join(missing)}")
        texts = [Path(name).read_text(encoding="utf-8") for name in args.calibration_file]
    headwise = None
    if args.headwise_full is not None:
        headwise = dict(scores=args.head_scores, full=parse_full(args.headwise_full), sink=args.sink,
                        window=args.window)
    _, report = convert_model(args.model, args.kv_heads, args.method, texts, out_dir=args.output,
                              overwrite=args.overwrite, dtype=resolve_dtype(args.dtype),
                              calibration_tokens=args.calibration_tokens, headwise=headwise)
    print(f"converted {report.source} ({args.method}, {report.calibration_tokens} calibration tokens) -> {args.output}")
    print(report.table())
    return 0

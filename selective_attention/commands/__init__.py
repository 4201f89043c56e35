"""CLI subcommands; each module exposes `add_parser(subparsers)` and mirrors a Python API function."""

from __future__ import annotations

import argparse


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model/--dtype/--attn/--device, shared by every command that loads a model."""
    parser.add_argument("--model", default=None, help="HF model id, local dir or .gguf file (default: embedded SmolLM2)")
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 | auto")
    parser.add_argument("--attn", default="sdpa", help="base attention implementation: sdpa | eager | flash_attention_2")
    parser.add_argument("--device", default=None, help="e.g. cuda, cpu (default: where transformers puts it)")

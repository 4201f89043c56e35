"""`selective-attention tree-ppl`: perplexity of tree-kernel attention vs dense on one long text (Quest protocol).

    selective-attention tree-ppl --context 8192 --windows 1 --budgets 256 512 1024 --dense-layers 0,1 \\
        --methods dense topk bound rescore alignment

Every configuration scores the same tokens (teacher-forced, per-row causal selection), so differences are the
attention approximation alone. The flags are the fields of `selective_attention.tree_kernel.perplexity.TreePplConfig`;
the run is `run_tree_ppl` (writes <output>.json, <output>_nll.json, <output>.md and <output>.png, resumable).
"""

from __future__ import annotations

import argparse

from selective_attention.cli.arguments import add_config_arguments, add_model_arguments, config_from_args
from selective_attention.loading import load_model
from selective_attention.tree_kernel.perplexity import TreePplConfig, resume, run_tree_ppl


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("tree-ppl", help="perplexity of tree-kernel attention methods vs dense")
    add_model_arguments(parser)
    add_config_arguments(parser, TreePplConfig)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(TreePplConfig, args)
    resume(config, args.model, args.dtype)  # refuses an output from other settings before the model loads
    model, tokenizer = load_model(args.model, dtype=args.dtype, attn_implementation=args.attn, device=args.device)
    outcome = run_tree_ppl(model, tokenizer, config, model_name=args.model, dtype=args.dtype)
    print("\n".join(outcome["report"]))
    return 0

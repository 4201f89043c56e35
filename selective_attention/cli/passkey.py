"""`selective-attention passkey`: passkey retrieval accuracy under the tree kernel (Landmark / Quest prompt).

    selective-attention passkey --lengths 2048 4096 8192 --budgets 32 64 128 256 512 --methods topk bound rescore

Per (length, depth, seed): one dense prefill of everything but the final question, then the question and a greedy
answer decoded under dense attention and every method x budget. Trials are written as they finish (JSON,
atomically; an interrupted run resumes). Writes <output>.json, <output>.md and <output>.png.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from selective_attention.cli.arguments import add_model_arguments
from selective_attention.io import load_resumable, write_json, write_text
from selective_attention.loading.loader import load_model
from selective_attention.plots.tree_kernel import plot_passkey
from selective_attention.tree_kernel import TreeKernelConfig
from selective_attention.tree_kernel.config import RANKS
from selective_attention.tree_kernel.evaluation import approximated_layers
from selective_attention.tree_kernel.passkey import accuracy, passkey_grid

logger = logging.getLogger(__name__)

METHODS = ("topk", "bound", "rescore")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("passkey", help="passkey retrieval accuracy of tree-kernel attention vs dense")
    add_model_arguments(parser)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192], help="prompt tokens")
    parser.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="random seeds of the pass keys")
    parser.add_argument("--budgets", type=int, nargs="+", default=[32, 64, 128, 256, 512], help="keys per row")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--dense-layers", default="0,1", help="layers kept exact, comma-separated, or 'none'")
    parser.add_argument("--leaf-block", type=int, default=16, help="bound, rescore: keys per block")
    parser.add_argument("--candidates", type=float, default=4.0, help="rescore: candidates as a multiple of budget")
    parser.add_argument("--rank", default="bound", choices=RANKS,
                        help="bound, rescore: block rank score (Quest's upper bound, q . mean key, or their average)")
    parser.add_argument("--tail", type=int, default=None,
                        help="last prompt tokens decoded under the tree kernel (default: the final question)")
    parser.add_argument("--answer-tokens", type=int, default=8)
    parser.add_argument("--output", default="results/passkey")
    parser.set_defaults(func=run)


def configurations(args: argparse.Namespace, layers: tuple[int, ...]) -> list[tuple[str, TreeKernelConfig | None]]:
    out: list[tuple[str, TreeKernelConfig | None]] = [("dense", None)]
    for budget in args.budgets:
        for method in args.methods:
            extra = dict(leaf_block=args.leaf_block, rank=args.rank) if method != "topk" else {}
            if method == "rescore":
                extra["candidates"] = args.candidates
            out.append((f"{method}@{budget}", TreeKernelConfig(method=method, budget=budget, min_keys=1,
                                                                layers=layers, **extra)))
    return out


def report(table: dict[str, dict[str, float]], settings: dict, budgets: list[int], methods: list[str]) -> list[str]:
    lengths = sorted(table, key=int)
    trials = settings["trials_per_length"]
    lines = [f"# Passkey retrieval: {settings['model']}, dense layers {settings['dense_layers']}, {trials} trials per "
             f"length (depths {settings['depths']} x seeds {settings['seeds']})", "",
             "| method | budget | " + " | ".join(f"{length} tokens" for length in lengths) + " |",
             "|---|---:|" + "---:|" * len(lengths)]
    rows = [("dense", "all", "dense")] + [(m, str(b), f"{m}@{b}") for b in budgets for m in methods]
    for method, budget, name in rows:
        cells = [f"{table[length][name]:.2f}" if name in table[length] else "-" for length in lengths]
        lines.append(f"| {method} | {budget} | " + " | ".join(cells) + " |")
    return lines


def run(args: argparse.Namespace) -> int:
    dense_layers = [] if args.dense_layers == "none" else [int(x) for x in args.dense_layers.split(",") if x]
    output = Path(args.output)
    json_path = output.with_suffix(".json")
    settings = dict(model=args.model or "embedded SmolLM2-135M-Instruct", dense_layers=args.dense_layers,
                    leaf_block=args.leaf_block, candidates=args.candidates, tail=args.tail,
                    **({"rank": args.rank} if args.rank != "bound" else {}),  # earlier files resume unchanged
                    answer_tokens=args.answer_tokens, dtype=args.dtype)
    done = load_resumable(json_path, settings).get("trials", {})  # before the model: other settings are refused
    model, tokenizer = load_model(args.model, dtype=args.dtype, attn_implementation=args.attn, device=args.device)
    configs = configurations(args, approximated_layers(model, dense_layers))

    def save(key: str, row: dict) -> None:
        write_json(json_path, dict(settings=settings, trials=done))

    passkey_grid(model, tokenizer, args.lengths, args.depths, args.seeds, configs, done, save, args.tail,
                 args.answer_tokens)
    table = accuracy(done)
    shown = dict(settings, depths=args.depths, seeds=args.seeds, trials_per_length=len(args.depths) * len(args.seeds))
    lines = report(table, shown, args.budgets, args.methods)
    write_text(output.with_suffix(".md"), "\n".join(lines) + "\n")
    by_budget = {length: {"0": {"dense": names["dense"]}} if "dense" in names else {} for length, names in
                 table.items()}
    for length, names in table.items():
        for name, value in names.items():
            if "@" in name:
                method, budget = name.split("@")
                by_budget[length].setdefault(budget, {})[method] = value
    plot_passkey(by_budget, output.with_suffix(".png"), f"passkey retrieval, {settings['model']}")
    print("\n".join(lines))
    return 0

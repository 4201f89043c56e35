"""`selective-attention tree-ppl`: true-next-token perplexity of tree-kernel attention vs dense, same windows.

Every configuration scores the same non-overlapping windows of the text (teacher-forced prefill, per-row causal
selection), so differences are the attention approximation alone. Results are written after each configuration
(JSON, atomically), so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import torch

from .. import assets
from ..tree_kernel import SAMPLED_METHODS, TreeKernelConfig, configure_tree_kernel
from ..loading import load_model
from . import add_model_arguments

logger = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("tree-ppl", help="perplexity of tree-kernel attention methods vs dense")
    add_model_arguments(parser)
    parser.add_argument("--text", default=None, help="text file (default: the embedded Paul Graham essays)")
    parser.add_argument("--dataset", default=None, help="HF dataset 'name[:config]:split:column' instead of --text")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--sampled-windows", type=int, default=None, help="windows for the (slow) sampled methods")
    parser.add_argument("--methods", nargs="+", default=["dense", "bound", "topk", *SAMPLED_METHODS])
    parser.add_argument("--exponents", type=float, nargs="+", default=[0.3, 0.5, 0.7, 0.9])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    parser.add_argument("--leaf-blocks", type=int, nargs="+", default=[16], help="bound: keys per leaf block")
    parser.add_argument("--descent", choices=["flat", "tree"], default="flat", help="bound: block selection")
    parser.add_argument("--sharing", choices=["per_head", "kv_group", "all"], default=None,
                        help="heads that share one selection (default: per_head for bound/topk, all for sampled)")
    parser.add_argument("--estimates", nargs="+", default=["mean", "none"], help="bound: rest-mass estimate")
    parser.add_argument("--layers", default=None, help="comma-separated layers (default all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="results/tree_ppl")
    parser.set_defaults(func=run)


def load_tokens(tokenizer, text: str | None, dataset: str | None, needed: int) -> torch.Tensor:
    if dataset:
        from datasets import load_dataset

        parts = dataset.split(":")
        if len(parts) not in (3, 4):
            raise ValueError("--dataset must be 'name[:config]:split:column'")
        name, config, split, column = (parts[0], None, parts[1], parts[2]) if len(parts) == 3 else parts
        rows = load_dataset(name, config, split=split)
        body = "\n\n".join(rows[column])
    elif text:
        path = Path(text)
        if not path.exists():
            raise FileNotFoundError(f"text file {path} not found")
        body = path.read_text(encoding="utf-8")
    else:
        body = "\n\n".join(p.read_text(encoding="utf-8") for p in sorted(assets.haystack_dir().glob("*.txt")))
    ids = tokenizer(body, add_special_tokens=False, return_tensors="pt").input_ids[0]
    if ids.numel() < needed:
        raise ValueError(f"text has {ids.numel()} tokens, need {needed}")
    return ids


def perplexity(model, windows: list[torch.Tensor]) -> tuple[float, int]:
    """exp(mean NLL of the true next token) over all windows."""
    total, count = 0.0, 0
    with torch.inference_mode():
        for ids in windows:
            logits = model(ids[None], use_cache=False).logits[0, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits, ids[1:], reduction="sum")
            total += float(nll)
            count += ids.numel() - 1
    return math.exp(total / count), count


def configurations(args) -> list[tuple[str, dict]]:
    out = []
    for method in args.methods:
        if method == "dense":
            out.append(("dense", dict(method="dense")))
        elif method == "bound":
            for leaf in args.leaf_blocks:
                for fraction in args.fractions:
                    for estimate in args.estimates:
                        name = f"bound/{args.descent}/b{leaf}/{estimate}@{fraction}"
                        out.append((name, dict(method="bound", fraction=fraction, estimate=estimate, leaf_block=leaf,
                                               descent=args.descent, sharing=args.sharing)))
        elif method == "topk":
            for fraction in args.fractions:
                out.append((f"topk@{fraction}", dict(method="topk", fraction=fraction, sharing=args.sharing)))
    # sampled methods: every method at the first exponent before the next exponent, so a partial run covers all
    for exponent in args.exponents:
        for method in args.methods:
            if method in SAMPLED_METHODS:
                out.append((f"{method}@E={exponent}", dict(method=method, exponent=exponent, sharing=args.sharing)))
    return out


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = results.get("dense", {}).get("ppl")
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    series: dict[str, list] = {}
    for name, row in results.items():
        if name == "dense":
            continue
        family = name.split("@")[0]
        x = row["config"].get("exponent") or row["config"].get("fraction")
        series.setdefault(family, []).append((x, row["ppl"], row["exact_fraction"], row["terms_fraction"]))
    for family, points in sorted(series.items()):
        points.sort()
        axis = left if family in SAMPLED_METHODS else right
        line, = axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=family)
        twin = getattr(axis, "_twin", None) or axis.twinx()
        axis._twin = twin
        twin.plot([p[0] for p in points], [p[3] for p in points], ls=":", color=line.get_color())
    for axis, xlabel in ((left, "exponent E (buds = l^E)"), (right, "budget fraction of keys")):
        if dense:
            axis.axhline(dense, color="black", ls="--", label=f"dense {dense:.2f}")
        axis.set_xlabel(xlabel)
        axis.set_ylabel("perplexity (solid)")
        axis.set_yscale("log")
        axis.legend(fontsize=7)
        if getattr(axis, "_twin", None):
            axis._twin.set_ylabel("fraction of keys in softmax (dotted)")
    left.set_title("sampled methods (originating paper)")
    right.set_title("bound (with / without rest estimate) vs top-k oracle")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    model, tokenizer = load_model(args.model, dtype=args.dtype, attn_implementation=args.attn, device=args.device)
    ids = load_tokens(tokenizer, args.text, args.dataset, args.context * args.windows)
    windows = [ids[i * args.context:(i + 1) * args.context].to(model.device) for i in range(args.windows)]
    layers = tuple(int(x) for x in args.layers.split(",")) if args.layers else None
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    json_path = output.with_suffix(".json")
    saved = json.loads(json_path.read_text()) if json_path.exists() else {}
    settings = dict(model=args.model or "embedded SmolLM2-135M-Instruct", context=args.context, windows=args.windows,
                    sampled_windows=args.sampled_windows or args.windows, layers=args.layers, text=args.text or "PG essays")
    results = saved.get("results", {}) if saved.get("settings") == settings else {}
    for name, options in configurations(args):
        if name in results:
            logger.info("%s: already measured (resume)", name)
            continue
        config = TreeKernelConfig(layers=layers, seed=args.seed, **options)
        configure_tree_kernel(model, config)
        use = windows[:args.sampled_windows] if (args.sampled_windows and config.method in SAMPLED_METHODS) else windows
        start = time.perf_counter()
        ppl, scored = perplexity(model, use)
        # dense runs plain SDPA (no statistics): it scores every key exactly
        exact, terms = (1.0, 1.0) if config.method == "dense" else (config.stats.exact_fraction,
                                                                      config.stats.terms_fraction)
        results[name] = dict(ppl=ppl, scored_tokens=scored, config=config.to_dict(), exact_fraction=exact,
                             terms_fraction=terms, seconds=time.perf_counter() - start)
        logger.info("%s: ppl %.3f exact keys %.3f terms %.3f (%d tokens, %.0fs)", name, ppl, exact, terms, scored,
                    results[name]["seconds"])
        write_atomic(json_path, json.dumps(dict(settings=settings, results=results), indent=2))
    configure_tree_kernel(model, None)
    dense = results.get("dense", {}).get("ppl")
    lines = [f"# Tree-kernel perplexity ({settings['model']}, context {args.context}, {settings['text']})", "",
             "| configuration | ppl | vs dense | exact keys | softmax terms / keys | scored tokens |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, row in results.items():
        delta = f"{100 * (row['ppl'] / dense - 1):+.1f}%" if dense else "-"
        lines.append(f"| {name} | {row['ppl']:.3f} | {delta} | {row['exact_fraction']:.3f} | "
                     f"{row['terms_fraction']:.3f} | {row['scored_tokens']} |")
    write_atomic(output.with_suffix(".md"), "\n".join(lines) + "\n")
    plot(results, output.with_suffix(".png"))
    print("\n".join(lines))
    return 0

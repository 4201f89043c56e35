"""`selective-attention tree-ppl`: perplexity of tree-kernel attention vs dense on one long text (Quest protocol).

    selective-attention tree-ppl --context 8192 --windows 1 --budgets 256 512 1024 --dense-layers 0,1 \
        --methods dense topk bound rescore alignment

Every configuration scores the same tokens (teacher-forced, per-row causal selection), so differences are the
attention approximation alone. Results are written after each configuration (JSON, atomically), so an interrupted
run resumes where it stopped. Writes <output>.json (perplexities and costs per row), <output>_nll.json (per-token
NLL), <output>.md and <output>.png (cumulative perplexity vs position).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from selective_attention.cli.arguments import add_model_arguments
from selective_attention.io import write_json, write_text
from selective_attention.loading.loader import load_model
from selective_attention.plots.tree_kernel import plot_cumulative_perplexity
from selective_attention.tree_kernel import SAMPLED_METHODS, TreeKernelConfig
from selective_attention.tree_kernel.evaluation import (
    approximated_layers,
    load_tokens,
    past_budget_rows,
    perplexity,
    sweep,
)

logger = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("tree-ppl", help="perplexity of tree-kernel attention methods vs dense")
    add_model_arguments(parser)
    parser.add_argument("--text", default=None, help="text file (default: the embedded Paul Graham essays)")
    parser.add_argument("--dataset", default=None,
                        help="HF dataset 'name[:config]:split:column' (e.g. emozilla/pg19:test:text): its first "
                             "document long enough is scored (needs network)")
    parser.add_argument("--context", type=int, default=8192, help="tokens per window")
    parser.add_argument("--windows", type=int, default=1)
    parser.add_argument("--methods", nargs="+", default=["dense", "topk", "bound", "rescore", "alignment"])
    parser.add_argument("--budgets", type=int, nargs="+", default=None,
                        help="keys per row (default 256 512 1024 unless --fractions or --exponents is given)")
    parser.add_argument("--fractions", type=float, nargs="+", default=[],
                        help="topk, bound, rescore: budgets as a fraction of each row's keys instead")
    parser.add_argument("--exponents", type=float, nargs="+", default=[],
                        help="sampled methods: T = ceil(l^E) buds instead of --budgets")
    parser.add_argument("--dense-layers", default="0,1", help="layers kept exact, comma-separated, or 'none'")
    parser.add_argument("--leaf-blocks", type=int, nargs="+", default=[16], help="bound, rescore: keys per block")
    parser.add_argument("--candidates", type=float, nargs="+", default=[4.0],
                        help="rescore: candidate keys as a multiple of the budget")
    parser.add_argument("--sharing", choices=["per_head", "kv_group", "all"], default=None,
                        help="heads sharing one selection (default: per_head for topk/bound, kv_group for "
                             "rescore, all for sampled methods)")
    parser.add_argument("--estimates", nargs="+", default=["mean"], help="bound, rescore: rest-mass estimate")
    parser.add_argument("--sampled-windows", type=int, default=None, help="windows for the (slow) sampled methods")
    parser.add_argument("--seed-windows", dest="sampled_windows", type=int, help=argparse.SUPPRESS)  # old name
    parser.add_argument("--seed", type=int, default=0, help="random seed (feature draws, sampled descent)")
    parser.add_argument("--output", default="results/tree_ppl")
    parser.set_defaults(func=run)


def configurations(args: argparse.Namespace, layers: tuple[int, ...]) -> list[tuple[str, TreeKernelConfig | None,
                                                                                    int | None]]:
    """(name, config, budget in keys or None) for every method x budget x variant; sampled methods last."""
    out = [("dense", None, None)] if "dense" in args.methods else []
    common = dict(layers=layers, seed=args.seed, sharing=args.sharing)
    budgets = args.budgets if args.budgets is not None else ([] if args.fractions or args.exponents
                                                             else [256, 512, 1024])
    modes = [(str(b), dict(budget=b), b) for b in budgets] + [(f"{f:g}", dict(fraction=f), None)
                                                              for f in args.fractions]
    for label, size, budget in modes:
        for method in args.methods:
            if method == "topk":
                out.append((f"topk@{label}", TreeKernelConfig(method="topk", **size, **common), budget))
            for leaf in args.leaf_blocks:
                for estimate in args.estimates:
                    if method == "bound":
                        out.append((f"bound/b{leaf}/{estimate}@{label}", TreeKernelConfig(
                            method="bound", leaf_block=leaf, estimate=estimate, **size, **common), budget))
                    if method == "rescore":
                        for factor in args.candidates:
                            config = TreeKernelConfig(method="rescore", leaf_block=leaf, estimate=estimate,
                                                      candidates=factor, **size, **common)
                            out.append((f"rescore/b{leaf}/x{factor:g}/{config.sharing}/{estimate}@{label}", config,
                                        budget))
    sampled = [(str(b), dict(budget=b), b) for b in budgets] + [(f"E={e:g}", dict(exponent=e), None)
                                                                for e in args.exponents]
    for label, size, budget in sampled:
        for method in args.methods:
            if method in SAMPLED_METHODS:
                out.append((f"{method}@{label}", TreeKernelConfig(method=method, **size, **common), budget))
    unknown = sorted(set(args.methods) - {"dense", "topk", "bound", "rescore", *SAMPLED_METHODS})
    if unknown:
        raise ValueError(f"unknown methods {unknown}")
    return out


def report(results: dict, nll: dict, settings: dict) -> list[str]:
    """Markdown: perplexity overall and past each budget, excess over dense, costs per row past the budget."""
    dense = nll.get("dense")
    lines = [f"# Tree-kernel perplexity: {settings['model']}, {settings['text']}, {settings['windows']} x "
             f"{settings['context']} tokens, dense layers {settings['dense_layers']}", "",
             "Costs are per row past the budget, averaged over approximated layers and heads: keys whose values are "
             "read (exact), softmax terms, block bounds evaluated, keys scored exactly (rescored).", "",
             "| configuration | budget | ppl | ppl past budget | dense past budget | excess past budget | exact keys | "
             "terms | bounds | rescored | seconds |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, row in results.items():
        budget = row.get("budget")
        past = None if budget is None else [past_budget_rows(len(n) + 1, budget) for n in nll[name]]
        ppl_past = perplexity(_flat(nll[name]), _flat_mask(past)) if past else row["ppl"]
        dense_past = perplexity(_flat(dense), _flat_mask(past)) if dense and past else float("nan")
        excess = f"{100 * (ppl_past / dense_past - 1):+.2f}%" if dense and past else "-"
        costs = (row.get("costs") or {}).get("past_budget") or {}
        cells = [f"{costs[k]:.1f}" if k in costs else "all" for k in ("exact", "terms", "bounds", "rescored")]
        past_cells = f"{ppl_past:.3f} | {dense_past:.3f} | {excess}" if past else "- | - | -"
        label = name.split("@")[1] if "@" in name else "all"
        lines.append(f"| {name} | {label} | {row['ppl']:.3f} | {past_cells} | {' | '.join(cells)} | "
                     f"{row['seconds']:.0f} |")
    return lines


def _flat(nested: list[list[float]]) -> torch.Tensor:
    return torch.tensor([x for part in nested for x in part])


def _flat_mask(masks: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(masks)


def run(args: argparse.Namespace) -> int:
    dense_layers = [] if args.dense_layers == "none" else [int(x) for x in args.dense_layers.split(",") if x]
    model, tokenizer = load_model(args.model, dtype=args.dtype, attn_implementation=args.attn, device=args.device)
    layers = approximated_layers(model, dense_layers)
    configs = configurations(args, layers)
    ids = load_tokens(tokenizer, args.text, args.dataset, args.context * args.windows)
    windows = [ids[i * args.context:(i + 1) * args.context].to(model.device) for i in range(args.windows)]
    output = Path(args.output)
    json_path, nll_path = output.with_suffix(".json"), output.with_name(output.name + "_nll.json")
    settings = dict(model=args.model or "embedded SmolLM2-135M-Instruct", context=args.context, windows=args.windows,
                    dense_layers=args.dense_layers, text=args.dataset or args.text or "PG essays", dtype=args.dtype)
    saved = json.loads(json_path.read_text()) if json_path.exists() else {}
    same = saved.get("settings") == settings and nll_path.exists()
    results = saved.get("results", {}) if same else {}
    nll = json.loads(nll_path.read_text()) if same else {}
    sampled = windows[:args.sampled_windows] if args.sampled_windows else windows

    def save(name: str, row: dict) -> None:
        nll[name] = [[round(x, 4) for x in part] for part in row.pop("nll")]
        row["budget"] = next(b for n, _, b in configs if n == name)
        write_json(nll_path, nll, indent=None)
        write_json(json_path, dict(settings=settings, results=results))

    for name, config, budget in configs:
        use = sampled if config is not None and config.method in SAMPLED_METHODS else windows
        sweep(model, use, [(name, config, budget)], results, save)
    lines = report(results, nll, settings)
    write_text(output.with_suffix(".md"), "\n".join(lines) + "\n")
    if "dense" in nll and len(nll) > 1:
        reference = _flat(nll["dense"])
        curves: dict[str, dict[str, list[float]]] = {}
        for name in results:
            if name != "dense" and len(_flat(nll[name])) == len(reference):  # sampled methods may score fewer
                curves.setdefault(name.split("@")[1], {})[name.split("@")[0]] = _flat(nll[name]).tolist()
        plot_cumulative_perplexity(reference.tolist(), curves, output.with_suffix(".png"),
                                   f"{settings['model']}, {settings['text']}, dense layers {settings['dense_layers']}")
    print("\n".join(lines))
    return 0

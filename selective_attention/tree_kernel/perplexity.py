"""The `tree-ppl` experiment: perplexity of tree-kernel methods vs dense on one long text (Quest protocol).

`run_tree_ppl(model, tokenizer, TreePplConfig(...))` scores every method x budget x variant on the same windows
(`evaluation.sweep`), writes after each configuration (JSON, atomically, so an interrupted run resumes), then the
report: <output>.json (perplexities and costs per row), <output>_nll.json (per-token NLL), <output>.md and
<output>.png (cumulative perplexity vs position).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from selective_attention.io import load_resumable, write_json, write_text
from selective_attention.plots.tree_kernel import plot_cumulative_perplexity
from selective_attention.tree_kernel.config import ESTIMATES, METHODS, RANKS, SAMPLED_METHODS, SHARING, TreeKernelConfig
from selective_attention.tree_kernel.evaluation import (
    approximated_layers,
    load_tokens,
    past_budget_rows,
    perplexity,
    sweep,
)

#: budgets (keys per row) when neither budgets, fractions nor exponents are given
DEFAULT_BUDGETS = (256, 512, 1024)


@dataclass
class TreePplConfig:
    """One `tree-ppl` run; each field is also a flag of the command (`--dense-layers` for `dense_layers`)."""

    text: str | None = field(default=None, metadata={"help": "text file (default: the embedded Paul Graham essays)"})
    dataset: str | None = field(default=None, metadata={
        "help": "HF dataset 'name[:config]:split:column' (e.g. emozilla/pg19:test:text): its first document long "
                "enough is scored (needs network)"})
    context: int = field(default=8192, metadata={"help": "tokens per window"})
    windows: int = field(default=1, metadata={"help": "windows of `context` tokens, scored one after the other"})
    methods: list[str] = field(default_factory=lambda: ["dense", "topk", "bound", "rescore", "alignment"],
                               metadata={"help": "methods to score", "choices": METHODS})
    budgets: list[int] | None = field(default=None, metadata={
        "help": "keys per row (default 256 512 1024 unless --fractions or --exponents is given)"})
    fractions: list[float] = field(default_factory=list, metadata={
        "help": "topk, bound, rescore: budgets as a fraction of each row's keys instead"})
    exponents: list[float] = field(default_factory=list, metadata={
        "help": "sampled methods: T = ceil(l^E) buds instead of --budgets"})
    dense_layers: str = field(default="0,1", metadata={"help": "layers kept exact, comma-separated, or 'none'"})
    leaf_blocks: list[int] = field(default_factory=lambda: [16], metadata={"help": "bound, rescore: keys per block"})
    candidates: list[float] = field(default_factory=lambda: [4.0], metadata={
        "help": "rescore: candidate keys as a multiple of the budget"})
    sharing: str | None = field(default=None, metadata={
        "help": "heads sharing one selection (default: per_head for topk/bound, kv_group for rescore, all for "
                "sampled methods)", "choices": SHARING})
    estimates: list[str] = field(default_factory=lambda: ["mean"], metadata={
        "help": "bound, rescore: rest-mass estimate", "choices": ESTIMATES})
    ranks: list[str] = field(default_factory=lambda: ["bound"], metadata={
        "help": "bound, rescore: block rank score (Quest's upper bound, q . mean key, or their average)",
        "choices": RANKS})
    sampled_windows: int | None = field(default=None, metadata={
        "help": "windows for the (slow) sampled methods", "aliases": ["--seed-windows"]})
    score_last: int | None = field(default=None, metadata={
        "help": "score only each window's last N tokens, after a dense prefill of the rest (a quick proxy that ranks "
                "variants)"})
    seed: int = field(default=0, metadata={"help": "random seed (feature draws, sampled descent)"})
    output: str = field(default="results/tree_ppl", metadata={"help": "output stem (.json, _nll.json, .md, .png)"})

    def __post_init__(self) -> None:
        if self.score_last is not None and not 1 < self.score_last <= self.context:
            raise ValueError(f"score_last must be in [2, context={self.context}], got {self.score_last}")

    def dense_prefix(self) -> int:
        """Tokens of each window prefilled densely and not scored."""
        return self.context - self.score_last if self.score_last else 0

    def dense_layer_list(self) -> list[int]:
        return [] if self.dense_layers == "none" else [int(x) for x in self.dense_layers.split(",") if x]


Configuration = tuple[str, "TreeKernelConfig | None", "int | None"]  # (name, config or None = dense, budget)


def configurations(config: TreePplConfig, layers: tuple[int, ...]) -> list[Configuration]:
    """(name, config, budget in keys or None) for every method x budget x variant; sampled methods last."""
    unknown = sorted(set(config.methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}")
    out: list[Configuration] = [("dense", None, None)] if "dense" in config.methods else []
    common = dict(layers=layers, seed=config.seed, sharing=config.sharing)
    budgets = config.budgets if config.budgets is not None else (
        [] if config.fractions or config.exponents else list(DEFAULT_BUDGETS))
    modes = [(str(b), dict(budget=b), b) for b in budgets] + [(f"{f:g}", dict(fraction=f), None)
                                                              for f in config.fractions]
    for label, size, budget in modes:
        for method in config.methods:
            if method == "topk":
                out.append((f"topk@{label}", TreeKernelConfig(method="topk", **size, **common), budget))
            for leaf, estimate, rank in itertools.product(config.leaf_blocks, config.estimates, config.ranks):
                ranked = "" if rank == "bound" else f"/rank-{rank}"  # the default keeps the earlier names
                if method == "bound":
                    out.append((f"bound/b{leaf}/{estimate}{ranked}@{label}", TreeKernelConfig(
                        method="bound", leaf_block=leaf, estimate=estimate, rank=rank, **size, **common), budget))
                if method == "rescore":
                    for factor in config.candidates:
                        kernel = TreeKernelConfig(method="rescore", leaf_block=leaf, estimate=estimate,
                                                  candidates=factor, rank=rank, **size, **common)
                        out.append((f"rescore/b{leaf}/x{factor:g}/{kernel.sharing}/{estimate}{ranked}@{label}",
                                    kernel, budget))
    sampled = [(str(b), dict(budget=b), b) for b in budgets] + [(f"E={e:g}", dict(exponent=e), None)
                                                                for e in config.exponents]
    for label, size, budget in sampled:
        for method in config.methods:
            if method in SAMPLED_METHODS:
                out.append((f"{method}@{label}", TreeKernelConfig(method=method, **size, **common), budget))
    return out


def _flat(nested: list[list[float]]) -> torch.Tensor:
    return torch.tensor([x for part in nested for x in part])


def report(results: dict, nll: dict, settings: dict) -> list[str]:
    """Markdown: perplexity overall and past each budget, excess over dense, costs per row past the budget."""
    dense, context = nll.get("dense"), settings["context"]
    scored = f" (the last {settings['score_last']} scored, after a dense prefill)" if "score_last" in settings else ""
    lines = [f"# Tree-kernel perplexity: {settings['model']}, {settings['text']}, {settings['windows']} x "
             f"{settings['context']} tokens{scored}, dense layers {settings['dense_layers']}", "",
             "Costs are per row past the budget, averaged over approximated layers and heads: keys whose values are "
             "read (exact), softmax terms, block bounds evaluated, keys scored exactly (rescored).", "",
             "| configuration | budget | ppl | ppl past budget | dense past budget | excess past budget | exact keys | "
             "terms | bounds | rescored | seconds |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, row in results.items():
        budget = row.get("budget")
        past = None if budget is None else torch.cat([past_budget_rows(context, budget)[context - 1 - len(n):]
                                                      for n in nll[name]])  # a window's NLL: its last rows
        ppl_past = perplexity(_flat(nll[name]), past) if past is not None else row["ppl"]
        dense_past = perplexity(_flat(dense), past) if dense and past is not None else float("nan")
        excess = f"{100 * (ppl_past / dense_past - 1):+.2f}%" if dense and past is not None else "-"
        costs = (row.get("costs") or {}).get("past_budget") or {}
        cells = [f"{costs[k]:.1f}" if k in costs else "all" for k in ("exact", "terms", "bounds", "rescored")]
        past_cells = f"{ppl_past:.3f} | {dense_past:.3f} | {excess}" if past is not None else "- | - | -"
        label = name.split("@")[1] if "@" in name else "all"
        lines.append(f"| {name} | {label} | {row['ppl']:.3f} | {past_cells} | {' | '.join(cells)} | "
                     f"{row['seconds']:.0f} |")
    return lines


def output_paths(config: TreePplConfig) -> tuple[Path, Path]:
    """<output>.json (settings, perplexities, costs) and <output>_nll.json (per-token NLL)."""
    output = Path(config.output)
    return output.with_suffix(".json"), output.with_name(output.name + "_nll.json")


def resume(config: TreePplConfig, model_name: str | None = None, dtype: str = "float32") -> tuple[dict, dict, dict]:
    """(settings, results, per-token NLL) of the run so far in `config.output`; a file from other settings is refused
    (ValueError). Needs no model, so the command checks it before loading one."""
    settings = dict(model=model_name or "embedded SmolLM2-135M-Instruct", context=config.context,
                    windows=config.windows, dense_layers=config.dense_layers,
                    text=config.dataset or config.text or "PG essays", dtype=dtype,
                    **({"score_last": config.score_last} if config.score_last else {}))  # earlier files resume
    json_path, nll_path = output_paths(config)
    results = load_resumable(json_path, settings).get("results", {})
    nll = json.loads(nll_path.read_text(encoding="utf-8")) if nll_path.exists() else {}
    # the NLL file is written before the results file, so a row without its NLL is only a hand-edited leftover
    return settings, {name: row for name, row in results.items() if name in nll}, nll


def run_tree_ppl(model, tokenizer, config: TreePplConfig, model_name: str | None = None, dtype: str = "float32"
                 ) -> dict:
    """Score every configuration not yet in `config.output` (resuming one of the same settings), write the report
    files and return {"settings", "results", "report" (markdown lines)}."""
    settings, results, nll = resume(config, model_name, dtype)
    layers = approximated_layers(model, config.dense_layer_list())
    configs = configurations(config, layers)
    ids = load_tokens(tokenizer, config.text, config.dataset, config.context * config.windows)
    windows = [ids[i * config.context:(i + 1) * config.context].to(model.device) for i in range(config.windows)]
    json_path, nll_path = output_paths(config)
    sampled = windows[:config.sampled_windows] if config.sampled_windows else windows

    def save(name: str, row: dict) -> None:
        nll[name] = [[round(x, 4) for x in part] for part in row.pop("nll")]
        row["budget"] = next(b for n, _, b in configs if n == name)
        write_json(nll_path, nll, indent=None)
        write_json(json_path, dict(settings=settings, results=results))

    for name, kernel, budget in configs:
        use = sampled if kernel is not None and kernel.method in SAMPLED_METHODS else windows
        sweep(model, use, [(name, kernel, budget)], results, save, config.dense_prefix())
    lines = report(results, nll, settings)
    write_text(json_path.with_suffix(".md"), "\n".join(lines) + "\n")
    if "dense" in nll and len(nll) > 1:
        reference = _flat(nll["dense"])
        curves: dict[str, dict[str, list[float]]] = {}
        for name in results:
            if name != "dense" and len(_flat(nll[name])) == len(reference):  # sampled methods may score fewer
                curves.setdefault(name.split("@")[1], {})[name.split("@")[0]] = _flat(nll[name]).tolist()
        plot_cumulative_perplexity(reference.tolist(), curves, json_path.with_suffix(".png"),
                                   f"{settings['model']}, {settings['text']}, dense layers {settings['dense_layers']}"
                                   + (f", last {config.score_last} tokens" if config.score_last else ""),
                                   first_position=config.dense_prefix() + 1)
    return dict(settings=settings, results=results, report=lines)

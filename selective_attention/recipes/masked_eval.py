"""MNLI accuracy vs number of masked heads (seed 000's `evaluate.py --maskbottom K`, as a sweep).

Heads are ranked by a head-score file (Retrieval_Head format): `bottom` masks the lowest-scoring heads first,
`top` the highest, `random` a seeded draw that excludes the top K. `global` ranks every head of the model;
`per_layer` masks K heads in each chosen layer. The ablation mode (zero | uniform | mean) is recorded.
Outputs: masked_eval.json, masked_eval.md (table) and masked_eval.png (accuracy curve).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from selective_attention.heads.ids import head_key, parse_head
from selective_attention.heads.masking import mask_heads
from selective_attention.heads.scores import check_head_scores, load_head_scores, load_sidecar
from selective_attention.heads.selection import select_heads
from selective_attention.modeling import text_config
from selective_attention.plots.nli import plot_masked_accuracy
from selective_attention.recipes import nli, nli_data
from selective_attention.recipes.arguments import DataArguments, MaskedEvalArguments, ModelArguments
from selective_attention.recipes.io import RUN_MARKER, prepare_output_dir, write_json, write_text
from selective_attention.recipes.parsing import settings
from selective_attention.recipes.predict import load_nli_model, model_source, predict

logger = logging.getLogger(__name__)


def heads_for_count(scores: dict, count: int, *, order: str, scope: str, num_layers: int, num_heads: int,
                    layers: list[int] | None = None, seed: int = 0) -> list[tuple[int, int]]:
    """The heads masked at `count`: ranked globally, or `count` heads within each of `layers`."""
    if count == 0:
        return []
    if scope == "global":
        return select_heads(scores, f"{order}:{count}", seed=seed, num_layers=num_layers, num_heads=num_heads)
    chosen: list[tuple[int, int]] = []
    for layer in layers if layers is not None else range(num_layers):
        if not 0 <= layer < num_layers:
            raise ValueError(f"layer {layer} out of range: the model has {num_layers} layers")
        if count > num_heads:
            raise ValueError(f"per_layer count {count} exceeds the {num_heads} heads of a layer")
        within = {key: values for key, values in scores.items() if parse_head(key)[0] == layer}
        for head in range(num_heads):  # heads the file never scored count as 0
            within.setdefault(head_key(layer, head), [])
        chosen += select_heads(within, f"{order}:{count}", seed=seed + layer)
    return sorted(chosen)


def markdown_table(rows: list[dict], header: str) -> str:
    lines = [header, "", "| masked heads | accuracy | macro F1 | invalid | heads |", "|---:|---:|---:|---:|---|"]
    for row in rows:
        shown = ", ".join(row["heads"][:12]) + (" ..." if len(row["heads"]) > 12 else "")
        lines.append(f"| {row['masked']} | {row['accuracy']:.3f} | {row['macro_f1']:.3f} | {row['invalid']} | "
                     f"{shown or '-'} |")
    return "\n".join(lines) + "\n"


def run_masked_eval(model_args: ModelArguments, data: DataArguments, sweep: MaskedEvalArguments, *,
                    overwrite: bool = False) -> dict:
    """Sweep `sweep.counts`; returns the result also written to masked_eval.json."""
    output_dir = prepare_output_dir(sweep.output_dir, overwrite)
    write_json(output_dir / RUN_MARKER, settings(model_args, data, sweep))
    scores = load_head_scores(sweep.head_scores)
    examples = nli_data.load_run_splits(data, sweep.seed)[sweep.split]
    if not examples:
        raise ValueError(f"{sweep.split}_size is 0: nothing to evaluate")
    model, tokenizer = load_nli_model(model_args.model, model_args.head, dtype=model_args.dtype,
                                      attn_implementation=model_args.attn_implementation,
                                      trust_remote_code=model_args.trust_remote_code)
    text = text_config(model)
    num_layers, num_heads = text.num_hidden_layers, text.num_attention_heads
    check_head_scores(scores, num_layers, num_heads, load_sidecar(sweep.head_scores), source=sweep.head_scores)

    rows = []
    source = model_source(model_args.model)
    for count in sweep.counts:
        heads = heads_for_count(scores, count, order=sweep.order, scope=sweep.scope, num_layers=num_layers,
                                num_heads=num_heads, layers=sweep.layers, seed=sweep.seed)
        start = time.perf_counter()
        handle = mask_heads(model, heads, sweep.mask_mode) if heads else None
        try:
            predictions = predict(model, tokenizer, examples, model_args.head, batch_size=sweep.batch_size,
                                  max_new_tokens=sweep.max_new_tokens, max_length=data.max_length)
        finally:
            if handle is not None:
                handle.remove()
        metrics = nli.classification_metrics([p.label for p in predictions], [p.prediction for p in predictions])
        rows.append({"masked": len(heads), "requested": count, "accuracy": metrics["accuracy"],
                     "macro_f1": metrics["macro_f1"], "invalid": metrics["invalid"],
                     "heads": [head_key(*h) for h in heads], "metrics": metrics,
                     "seconds": round(time.perf_counter() - start, 2)})
        logger.info("%d heads masked (%s, %s %s): accuracy %.3f", len(heads), sweep.mask_mode, sweep.order,
                    sweep.scope, metrics["accuracy"])
        result = {"model": source, "head": model_args.head, "head_scores": sweep.head_scores,
                  "order": sweep.order, "scope": sweep.scope, "layers": sweep.layers, "mode": sweep.mask_mode,
                  "split": sweep.split, "examples": len(examples), "num_layers": num_layers,
                  "num_heads": num_heads, "rows": rows}
        write_json(output_dir / "masked_eval.json", result)  # after every count: an interrupted sweep keeps its rows

    title = f"{Path(source).name}: {sweep.order} heads ({sweep.scope}), mode={sweep.mask_mode}"
    write_text(output_dir / "masked_eval.md",
               markdown_table(rows, f"# MNLI accuracy vs masked heads\n\n{title}; {len(examples)} {sweep.split} "
                                    f"examples; head scores: `{sweep.head_scores}`"))
    plot_masked_accuracy(rows, output_dir / "masked_eval.png", title, chance=1 / len(nli.LABELS))
    return result

"""The head-score file as a store of detection trials: read, merge, write (atomically), fold in sharded parts.

`head_scores.json` holds the Retrieval_Head lists; its sidecar `head_scores.meta.json` holds every trial's record
keyed by (length, depth, needle). The lists are always rebuilt from the records, in grid order, so a file written
by one process, by several (each writing `head_scores.part-<rank>.json`) or by a resumed run is the same file.
"""

from __future__ import annotations

import logging
from pathlib import Path

from selective_attention.distributed.sharding import read_parts, remove_parts
from selective_attention.heads.ids import head_key
from selective_attention.heads.scores import load_head_scores, load_sidecar, save_head_scores, sidecar_path

logger = logging.getLogger(__name__)


def existing_records(output: Path | None, model_name: str, num_layers: int, num_heads: int) -> dict[str, dict]:
    """Trial records already in `output` (empty when it does not exist); refuses another model's file."""
    if output is None or not output.exists():
        return {}
    load_head_scores(output)  # valid format
    meta = load_sidecar(output)
    if meta is None or "trials" not in meta:
        raise ValueError(f"{output} exists but {sidecar_path(output).name} with its trial records does not; "
                         "choose another output path (nothing was overwritten)")
    _check_shape(output, meta, model_name, num_layers, num_heads)
    return {record["key"]: record for record in meta["trials"]}


def _check_shape(source: Path, meta: dict, model_name: str, num_layers: int, num_heads: int) -> None:
    theirs = (meta.get("num_layers"), meta.get("num_heads"))
    if theirs != (num_layers, num_heads):
        raise ValueError(f"{source} holds scores of {meta.get('model')} ({theirs[0]} layers x {theirs[1]} heads); "
                         f"this model has {num_layers} x {num_heads} (nothing was overwritten)")
    if meta.get("model") != model_name:
        logger.warning("merging into %s, made with model %s (now %s)", source, meta.get("model"), model_name)


def sort_key(record: dict) -> tuple:
    return (record["context_length_requested"], record["depth_percent"], record["needle"])


def assemble(records: dict[str, dict], num_layers: int, num_heads: int) -> dict[str, list[float]]:
    """The Retrieval_Head lists: per head, its score in every counted trial, trials in grid order."""
    counted = [r for r in sorted(records.values(), key=sort_key) if r["counted"]]
    return {head_key(layer, head): [r["scores"].get(head_key(layer, head), 0.0) for r in counted]
            for layer in range(num_layers) for head in range(num_heads)}


def write_records(output: Path | None, records: dict[str, dict], meta: dict, num_layers: int,
                  num_heads: int) -> dict[str, list[float]]:
    """Fill `meta` with the trial records, write scores + sidecar (when `output` is given); returns the scores."""
    scores = assemble(records, num_layers, num_heads)
    meta["trials"] = sorted(records.values(), key=sort_key)
    meta["counted_trials"] = sum(1 for r in records.values() if r["counted"])
    if output is not None:
        save_head_scores(output, scores, meta)
    return scores


def fold_parts(output: Path, meta: dict, model_name: str, num_layers: int, num_heads: int) -> int:
    """Merge the part files of a sharded run into `output`, then delete them; returns how many records they held.

    Records are keyed by trial, so a part whose records already reached the merged file (a process stopped
    between writing and deleting) adds nothing twice."""
    records, metas = read_parts(output)
    if not records and not metas:
        return 0
    for part_meta in metas:
        _check_shape(output, part_meta, model_name, num_layers, num_heads)
    merged = existing_records(output, model_name, num_layers, num_heads)
    merged.update((record["key"], record) for record in records)
    write_records(output, merged, meta, num_layers, num_heads)
    remove_parts(output)
    logger.info("merged %d trials from the part files into %s (%d trials)", len(records), output, len(merged))
    return len(records)

"""What a conversion will do: parse the requested KV heads, check them, and plan each layer.

Whole KV heads only (a head's `head_dim` rows of `k_proj`/`v_proj` move together, so RoPE pairs stay intact).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from selective_attention.gqa.conversion.grouping import best_partition, canonical, contiguous_partition, relative_error


@dataclass
class LayerReport:
    layer: int
    source_kv_heads: int
    kv_heads: int
    method: str  # keep | duplicate | mean | similarity
    groups: list[list[int]]  # new KV head -> the source KV heads it is made from
    error: float  # relative K/V reconstruction error on the calibration text (0 = exact)
    mean_error: float | None = None  # the same error for contiguous mean pooling (merged layers only)


@dataclass
class ConversionReport:
    source: str
    method: str
    calibration_tokens: int
    layers: list[LayerReport] = field(default_factory=list)

    @property
    def errors(self) -> list[float]:
        return [layer.error for layer in self.layers]

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        """Markdown table of the layers that changed."""
        lines = ["| layer | KV heads | method | error | mean-pool error | groups |", "|---|---|---|---|---|---|"]
        for row in self.layers:
            if row.method == "keep":
                continue
            mean = "" if row.mean_error is None else f"{row.mean_error:.4f}"
            lines.append(f"| {row.layer} | {row.source_kv_heads} -> {row.kv_heads} | {row.method} | {row.error:.4f} "
                         f"| {mean} | {row.groups} |")
        if len(lines) == 2:
            lines.append("| - | unchanged | keep | 0 | | |")
        return "\n".join(lines)


def parse_kv_heads(spec, source_counts: list[int]) -> list[int]:
    """Target KV heads per layer from a full list, a {layer: count} dict, or a string.

    Strings: "9" (every layer), "3,3,...,1" (one count per layer), or overrides "15:16,14:1" / "all:9"
    (later items win) applied to the source counts.
    """
    layers = len(source_counts)
    if isinstance(spec, int):
        return [spec] * layers
    if isinstance(spec, str):
        items = [item.strip() for item in spec.split(",") if item.strip()]
        if not items:
            raise ValueError("empty --kv-heads")
        if all(":" not in item for item in items):
            try:
                numbers = [int(item) for item in items]
            except ValueError:
                raise ValueError(f"cannot parse KV heads {spec!r}: expected N, a list N,N,... or L:N overrides") from None
            return numbers * layers if len(numbers) == 1 else parse_kv_heads(numbers, source_counts)
        overrides: dict[int, int] = {}
        for item in items:
            key, _, value = item.partition(":")
            try:
                count = int(value)
                targets = range(layers) if key.strip() == "all" else [int(key)]
            except ValueError:
                raise ValueError(f"cannot parse KV-head override {item!r}: expected LAYER:COUNT or all:COUNT") from None
            for layer in targets:
                overrides[layer] = count
        spec = overrides
    if isinstance(spec, dict):
        counts = list(source_counts)
        for layer, count in spec.items():
            layer = int(layer)
            if not -layers <= layer < layers:
                raise ValueError(f"layer index {layer} out of range: the model has {layers} layers (0..{layers - 1})")
            counts[layer] = int(count)
        return counts
    counts = [int(count) for count in spec]
    if len(counts) != layers:
        raise ValueError(f"got {len(counts)} KV-head counts for a model with {layers} layers")
    return counts


def divisors(number: int) -> list[int]:
    return [d for d in range(1, number + 1) if number % d == 0]


def query_groups(kv_map: list[int], kv_heads: int) -> list[list[int]]:
    """Source KV head -> the query heads that read it."""
    groups: list[list[int]] = [[] for _ in range(kv_heads)]
    for query, kv in enumerate(kv_map):
        groups[kv].append(query)
    return groups


def check_target(layer: int, num_heads: int, source: int, target: int, groups: list[list[int]], method: str) -> None:
    """Raise a ValueError that says why `target` KV heads cannot be formed, and which counts can."""
    if target < 1 or target > num_heads:
        raise ValueError(f"layer {layer}: {target} KV heads is impossible with {num_heads} query heads "
                         f"(each KV head serves at least one query head: use 1..{num_heads})")
    if target > source:
        split = target // source
        if target % source or any(len(group) % split for group in groups):
            valid = [d * source for d in divisors(min(len(g) for g in groups)) if all(len(g) % d == 0 for g in groups)]
            raise ValueError(
                f"layer {layer}: cannot raise {source} KV heads to {target}: duplication splits each of the "
                f"{source} query groups (sizes {[len(g) for g in groups]}) into equal whole-head parts; "
                f"valid counts: {valid}")
    elif target < source:
        if method == "duplicate":
            raise ValueError(f"layer {layer}: duplicate can only raise KV heads ({source} -> {target} lowers them); "
                             "use --method mean or similarity")


def plan_layer(layer: int, num_heads: int, source: int, target: int, kv_map: list[int], method: str,
               grams: tuple | None) -> tuple[LayerReport, list[int], list[list[int]]]:
    """(report, new query->KV map, new KV head -> source KV heads) for one layer."""
    groups = query_groups(kv_map, source)
    check_target(layer, num_heads, source, target, groups, method)
    if target == source:
        return LayerReport(layer, source, target, "keep", [[i] for i in range(source)], 0.0), list(kv_map), \
            [[i] for i in range(source)]
    if target > source:  # duplicate: split each query group into `split` equal parts, each with a copy of its head
        split = target // source
        new_map = list(kv_map)
        origins = []
        for kv, queries in enumerate(groups):
            part = len(queries) // split
            for piece in range(split):
                for query in queries[piece * part:(piece + 1) * part]:
                    new_map[query] = len(origins)
                origins.append([kv])
        return LayerReport(layer, source, target, "duplicate", origins, 0.0), new_map, origins
    weights = torch.tensor([float(len(queries)) for queries in groups], dtype=torch.float64)
    # KV x KV matrices: tiny, so the search runs on the CPU in float64 wherever the model's layers sit
    grams = tuple(gram.detach().to("cpu", torch.float64) for gram in grams) if grams is not None else None
    contiguous = contiguous_partition(source, target)
    mean_error = relative_error(grams, weights, contiguous)
    if method == "mean":
        partition, error = contiguous, mean_error
    else:
        combined = sum(gram / max(float((weights * gram.diagonal()).sum()), 1e-30) for gram in grams)
        partition = canonical(best_partition(combined, weights, target))
        error = relative_error(grams, weights, partition)
        if error > mean_error:  # float noise only; keep the guarantee exact
            partition, error = contiguous, mean_error
    owner = {kv: new for new, cluster in enumerate(partition) for kv in cluster}
    new_map = [owner[kv] for kv in kv_map]
    return LayerReport(layer, source, target, method, partition, error, mean_error), new_map, partition

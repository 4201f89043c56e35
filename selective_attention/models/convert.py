"""Llama-family checkpoint -> `selective_llama` with a chosen number of KV heads per layer.

Whole KV heads only (a head's `head_dim` rows of `k_proj`/`v_proj` move together, so RoPE pairs stay intact):

- ``duplicate`` raises a layer's KV heads: each query group is split and every new KV head is an exact copy of
  the old head it came from, so the model computes exactly the same function;
- ``mean`` lowers them by mean-pooling contiguous KV heads (Ainslie et al. 2023, "GQA");
- ``similarity`` lowers them by merging the KV heads whose key/value activations on calibration text are most
  alike: it searches groupings (exhaustively when few, else by local search from the contiguous grouping) for the
  least reconstruction error, and the contiguous grouping is always a candidate, so it is never worse than mean.

Reconstruction error of a layer: over calibration tokens and query heads, ||K_new - K||^2 / ||K||^2 averaged with
the same for V (RoPE rotates every head of a position alike, so it does not change the error).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .configuration_selective_llama import SelectiveLlamaConfig
from .modeling_selective_llama import SelectiveLlamaForCausalLM

logger = logging.getLogger(__name__)

METHODS = ("duplicate", "mean", "similarity")
SUPPORTED_MODEL_TYPES = ("llama", "selective_llama")
MAX_ENUMERATED_GROUPINGS = 20000
DROPPED_CONFIG_KEYS = ("model_type", "auto_map", "architectures", "transformers_version", "quantization_config",
                       "_name_or_path", "num_key_value_heads_per_layer", "kv_head_map", "conversion")
REPORT_FILE = "conversion_report.json"


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


# ----------------------------------------------------------------------------------------------- requests


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


def _divisors(number: int) -> list[int]:
    return [d for d in range(1, number + 1) if number % d == 0]


def _query_groups(kv_map: list[int], kv_heads: int) -> list[list[int]]:
    """Source KV head -> the query heads that read it."""
    groups: list[list[int]] = [[] for _ in range(kv_heads)]
    for query, kv in enumerate(kv_map):
        groups[kv].append(query)
    return groups


def _check_target(layer: int, num_heads: int, source: int, target: int, groups: list[list[int]], method: str) -> None:
    """Raise a ValueError that says why `target` KV heads cannot be formed, and which counts can."""
    if target < 1 or target > num_heads:
        raise ValueError(f"layer {layer}: {target} KV heads is impossible with {num_heads} query heads "
                         f"(each KV head serves at least one query head: use 1..{num_heads})")
    if target > source:
        split = target // source
        if target % source or any(len(group) % split for group in groups):
            valid = [d * source for d in _divisors(min(len(g) for g in groups)) if all(len(g) % d == 0 for g in groups)]
            raise ValueError(
                f"layer {layer}: cannot raise {source} KV heads to {target}: duplication splits each of the "
                f"{source} query groups (sizes {[len(g) for g in groups]}) into equal whole-head parts; "
                f"valid counts: {valid}")
    elif target < source:
        if method == "duplicate":
            raise ValueError(f"layer {layer}: duplicate can only raise KV heads ({source} -> {target} lowers them); "
                             "use --method mean or similarity")


# ----------------------------------------------------------------------------------------------- groupings


def _partition_cost(gram: torch.Tensor, weights: torch.Tensor, partition: list[list[int]]) -> float:
    """Sum over clusters of weighted squared deviation from the weighted cluster mean, from the Gram matrix."""
    total = 0.0
    for cluster in partition:
        index = torch.tensor(cluster)
        w = weights[index]
        block = gram[index][:, index]
        total += float((w * block.diagonal()).sum() - (w[:, None] * w[None, :] * block).sum() / w.sum())
    return total


def _set_partitions(items: list[int], clusters: int):
    """Every partition of `items` into exactly `clusters` non-empty blocks (Stirling numbers of the 2nd kind)."""
    if clusters == 0:
        if not items:
            yield []
        return
    if len(items) < clusters:
        return
    first, rest = items[0], items[1:]
    for partition in _set_partitions(rest, clusters - 1):  # `first` alone
        yield [[first], *partition]
    for partition in _set_partitions(rest, clusters):  # `first` joins a block
        for index in range(len(partition)):
            yield [*partition[:index], [first, *partition[index]], *partition[index + 1:]]


def _stirling(items: int, clusters: int) -> int:
    table = [[0] * (clusters + 1) for _ in range(items + 1)]
    table[0][0] = 1
    for n in range(1, items + 1):
        for k in range(1, clusters + 1):
            table[n][k] = k * table[n - 1][k] + table[n - 1][k - 1]
    return table[items][clusters]


def contiguous_partition(items: int, clusters: int) -> list[list[int]]:
    """Mean pooling's grouping: consecutive KV heads, sizes as equal as possible (equal when divisible)."""
    size, extra = divmod(items, clusters)
    partition, start = [], 0
    for index in range(clusters):
        length = size + (1 if index < extra else 0)
        partition.append(list(range(start, start + length)))
        start += length
    return partition


def best_partition(gram: torch.Tensor, weights: torch.Tensor, clusters: int) -> list[list[int]]:
    """Grouping of KV heads into `clusters` merged heads with the least reconstruction cost.

    Exhaustive when there are at most MAX_ENUMERATED_GROUPINGS groupings, else local search (move or swap one
    head at a time) starting from the contiguous grouping; either way never worse than contiguous.
    """
    items = gram.shape[0]
    contiguous = contiguous_partition(items, clusters)
    if _stirling(items, clusters) <= MAX_ENUMERATED_GROUPINGS:
        candidates = itertools.chain([contiguous], _set_partitions(list(range(items)), clusters))
        return min(candidates, key=lambda p: _partition_cost(gram, weights, p))
    best, best_cost = [list(c) for c in contiguous], _partition_cost(gram, weights, contiguous)
    improved = True
    while improved:
        improved = False
        for a, b in itertools.permutations(range(clusters), 2):
            for i in range(len(best[a])):
                trials = []
                if len(best[a]) > 1:  # move head i of cluster a into cluster b
                    trial = [list(c) for c in best]
                    trial[b].append(trial[a].pop(i))
                    trials.append(trial)
                for j in range(len(best[b])):  # swap it with head j of cluster b
                    trial = [list(c) for c in best]
                    trial[a][i], trial[b][j] = trial[b][j], trial[a][i]
                    trials.append(trial)
                for trial in trials:
                    cost = _partition_cost(gram, weights, trial)
                    if cost < best_cost - 1e-12:
                        best, best_cost, improved = trial, cost, True
                        break
                if improved:
                    break
            if improved:
                break
    return best


def _canonical(partition: list[list[int]]) -> list[list[int]]:
    return sorted((sorted(cluster) for cluster in partition), key=lambda cluster: cluster[0])


# ----------------------------------------------------------------------------------------------- loading


def _source_layout(config) -> tuple[list[int], list[list[int]]]:
    """(KV heads per layer, query->KV map per layer) of a llama or selective_llama config."""
    if getattr(config, "model_type", None) == "selective_llama":
        return list(config.num_key_value_heads_per_layer), [list(row) for row in config.kv_head_map]
    heads = config.num_attention_heads
    kv = config.num_key_value_heads or heads
    return [kv] * config.num_hidden_layers, [[h // (heads // kv) for h in range(heads)]] * config.num_hidden_layers


def _check_model_type(config, source: str) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{source} is a {model_type!r} model; convert supports Llama-architecture checkpoints "
                         f"(model_type {' or '.join(SUPPORTED_MODEL_TYPES)})")


def load_source(model_or_path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer or None, name) for a model object, HF id, local dir, .gguf file or None (embedded model).

    Refuses checkpoints whose tensors are missing or do not match the config: transformers would otherwise fill
    them with random values (which is how the reference conversion silently left a layer random).
    """
    if isinstance(model_or_path, PreTrainedModel):
        _check_model_type(model_or_path.config, type(model_or_path).__name__)
        return model_or_path, None, str(getattr(model_or_path, "name_or_path", "") or type(model_or_path).__name__)
    if model_or_path is None:
        from .. import assets

        model_or_path = assets.model_dir()
    name = str(model_or_path)
    kwargs: dict = {}
    source = name
    looks_local = os.path.isabs(name) or name.startswith((".", "~")) or name.endswith(".gguf") or os.path.exists(name)
    if looks_local and not os.path.exists(os.path.expanduser(name)):
        raise FileNotFoundError(f"model path {name} does not exist")
    if name.endswith(".gguf"):
        from transformers import GgufConfig

        path = Path(name).expanduser()
        source = str(path.parent)
        kwargs = dict(gguf_file=path.name)
    config = AutoConfig.from_pretrained(source, **kwargs)
    _check_model_type(config, name)
    load_kwargs = dict(kwargs)
    if "gguf_file" in kwargs:
        load_kwargs["quantization_config"] = GgufConfig(dequantize=True)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, output_loading_info=True, **load_kwargs)
    except (RuntimeError, OSError) as error:
        raise ValueError(f"cannot load {name}: {error}") from error
    problems = {key: info.get(key) for key in ("missing_keys", "mismatched_keys") if info.get(key)}
    if problems:
        raise ValueError(f"{name} is not a complete checkpoint for its config (tensors would be left random): "
                         + "; ".join(f"{key}: {sorted(map(str, value))[:8]}" for key, value in problems.items()))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except Exception as error:  # a checkpoint without tokenizer files still converts
        logger.warning("no tokenizer for %s (%s)", name, error)
        tokenizer = None
    return model.eval(), tokenizer, name


def default_calibration_texts() -> list[str]:
    """The first haystack essays (Paul Graham), enough for a few hundred tokens."""
    from .. import assets

    essays = sorted(assets.haystack_dir().glob("*.txt"))
    return [path.read_text(encoding="utf-8") for path in essays[:2]]


def calibration_token_ids(tokenizer, texts: list[str] | None, tokens: int) -> torch.Tensor:
    if tokenizer is None:
        raise ValueError("calibration needs a tokenizer: pass tokenizer=, or calibration_ids= token ids")
    texts = texts or default_calibration_texts()
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False, return_tensors="pt").input_ids[:, :tokens]
    if ids.shape[1] == 0:
        raise ValueError("calibration text is empty")
    return ids


def _attention_of_layers(model) -> dict[int, torch.nn.Module]:
    found = {}
    for module in model.modules():
        layer = getattr(module, "layer_idx", None)
        if isinstance(layer, int) and hasattr(module, "k_proj") and hasattr(module, "v_proj"):
            found[layer] = module
    return found


@torch.no_grad()
def kv_gram_matrices(model, ids: torch.Tensor, layers: list[int], kv_counts: list[int]) -> dict[int, tuple]:
    """Per layer: Gram matrices (KV head x KV head) of the key and value activations on `ids`."""
    modules = _attention_of_layers(model)
    grams: dict[int, tuple] = {}
    hooks = []

    def hook_for(layer: int):
        def hook(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None).float()
            count = kv_counts[layer]
            keys = module.k_proj(hidden.to(module.k_proj.weight.dtype)).float().reshape(-1, count, module.head_dim)
            values = module.v_proj(hidden.to(module.v_proj.weight.dtype)).float().reshape(-1, count, module.head_dim)
            grams[layer] = (torch.einsum("tid,tjd->ij", keys, keys), torch.einsum("tid,tjd->ij", values, values))
        return hook

    for layer in layers:
        hooks.append(modules[layer].register_forward_pre_hook(hook_for(layer), with_kwargs=True))
    try:
        model(input_ids=ids.to(model.device), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return grams


# ----------------------------------------------------------------------------------------------- conversion


def _merge_rows(weight: torch.Tensor, head_dim: int, partition: list[list[int]], weights: torch.Tensor) -> torch.Tensor:
    """Rows of new KV head j = weighted mean over the source heads in cluster j (whole heads of head_dim rows)."""
    heads = weight.reshape(-1, head_dim, *weight.shape[1:]).float()
    merged = []
    for cluster in partition:
        w = weights[torch.tensor(cluster)].float()
        merged.append((heads[cluster] * (w / w.sum()).reshape(-1, *[1] * (heads.dim() - 1))).sum(0))
    return torch.stack(merged).reshape(-1, *weight.shape[1:]).to(weight.dtype)


def _copy_rows(weight: torch.Tensor, head_dim: int, sources: list[int]) -> torch.Tensor:
    heads = weight.reshape(-1, head_dim, *weight.shape[1:])
    return heads[torch.tensor(sources)].reshape(-1, *weight.shape[1:]).clone()


def _relative_error(grams: tuple, weights: torch.Tensor, partition: list[list[int]]) -> float:
    total = 0.0
    for gram in grams:
        norm = float((weights * gram.diagonal()).sum())
        total += _partition_cost(gram, weights, partition) / max(norm, 1e-30)
    return max(total / len(grams), 0.0)


def plan_layer(layer: int, num_heads: int, source: int, target: int, kv_map: list[int], method: str,
               grams: tuple | None) -> tuple[LayerReport, list[int], list[list[int]]]:
    """(report, new query->KV map, new KV head -> source KV heads) for one layer."""
    groups = _query_groups(kv_map, source)
    _check_target(layer, num_heads, source, target, groups, method)
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
    weights = torch.tensor([float(len(queries)) for queries in groups])
    contiguous = contiguous_partition(source, target)
    mean_error = _relative_error(grams, weights, contiguous)
    if method == "mean":
        partition, error = contiguous, mean_error
    else:
        combined = sum(gram / max(float((weights * gram.diagonal()).sum()), 1e-30) for gram in grams)
        partition = _canonical(best_partition(combined, weights, target))
        error = _relative_error(grams, weights, partition)
        if error > mean_error:  # float noise only; keep the guarantee exact
            partition, error = contiguous, mean_error
    owner = {kv: new for new, cluster in enumerate(partition) for kv in cluster}
    new_map = [owner[kv] for kv in kv_map]
    return LayerReport(layer, source, target, method, partition, error, mean_error), new_map, partition


def convert_model(
    model_or_path=None,
    kv_heads=None,
    method: str = "duplicate",
    calibration_texts: list[str] | None = None,
    *,
    tokenizer=None,
    calibration_ids: torch.Tensor | None = None,
    calibration_tokens: int = 512,
    out_dir: str | Path | None = None,
    overwrite: bool = False,
    dtype: torch.dtype = torch.float32,
) -> tuple[SelectiveLlamaForCausalLM, ConversionReport]:
    """Convert a Llama-family model to `selective_llama` with `kv_heads` KV heads per layer.

    `kv_heads`: a list (one count per layer), {layer: count}, or a string ("9", "15:16,14:1", "all:1").
    Layers that gain heads are always duplicated (exact); layers that lose heads use `method` (mean | similarity).
    With `out_dir`, the checkpoint (+ tokenizer, `conversion_report.json`) is written to a temporary folder and
    moved into place only when complete.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if kv_heads is None:
        raise ValueError("kv_heads is required (e.g. '9', '29:1' or a list with one count per layer)")
    out_path = Path(out_dir).expanduser() if out_dir is not None else None
    if out_path is not None and out_path.exists() and not overwrite:
        raise ValueError(f"{out_path} already exists; pass overwrite=True (--overwrite) to replace it")

    source_model, loaded_tokenizer, source_name = load_source(model_or_path, dtype)
    tokenizer = tokenizer or loaded_tokenizer
    config = source_model.config
    num_heads, num_layers = config.num_attention_heads, config.num_hidden_layers
    source_counts, source_maps = _source_layout(config)
    targets = parse_kv_heads(kv_heads, source_counts)
    for layer in range(num_layers):  # validate every layer before any calibration work
        _check_target(layer, num_heads, source_counts[layer], targets[layer],
                      _query_groups(source_maps[layer], source_counts[layer]), method)

    merged_layers = [layer for layer in range(num_layers) if targets[layer] < source_counts[layer]]
    grams: dict[int, tuple] = {}
    used_tokens = 0
    if merged_layers:
        if calibration_ids is None:
            if tokenizer is None:
                try:
                    tokenizer = AutoTokenizer.from_pretrained(source_model.name_or_path)
                except Exception:
                    tokenizer = None
            calibration_ids = calibration_token_ids(tokenizer, calibration_texts, calibration_tokens)
        used_tokens = int(calibration_ids.numel())
        grams = kv_gram_matrices(source_model, calibration_ids, merged_layers, source_counts)

    reports, maps, origins = [], [], []
    for layer in range(num_layers):
        report, new_map, origin = plan_layer(layer, num_heads, source_counts[layer], targets[layer],
                                             source_maps[layer], method, grams.get(layer))
        reports.append(report)
        maps.append(new_map)
        origins.append(origin)
    report = ConversionReport(source=source_name, method=method, calibration_tokens=used_tokens, layers=reports)

    settings = {k: v for k, v in config.to_dict().items() if k not in DROPPED_CONFIG_KEYS}
    settings.update(num_key_value_heads_per_layer=targets, kv_head_map=maps, conversion={
        "method": method, "source": source_name, "source_kv_heads": source_counts,
        "layer_errors": report.errors, "groups": [row.groups for row in reports],
        "calibration_tokens": used_tokens,
    })
    new_config = SelectiveLlamaConfig(**settings)
    new_config._attn_implementation = config._attn_implementation
    state = _converted_state_dict(source_model, reports, origins, source_counts)
    if isinstance(model_or_path, PreTrainedModel):  # never share storage with a model the caller still holds
        state = {key: value.clone() for key, value in state.items()}
    model = _empty_model(new_config, dtype, state)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [key for key in missing if not (key == "lm_head.weight" and new_config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"converted state does not fit the new model: missing {missing[:8]}, unexpected {unexpected[:8]}")
    if new_config.tie_word_embeddings:
        model.tie_weights()
    if getattr(source_model, "generation_config", None) is not None:
        model.generation_config = source_model.generation_config
    model.eval()
    changed = [row for row in reports if row.method != "keep"]
    logger.info("converted %s (%s): %d layers changed, max error %.4f", source_name, method, len(changed),
                max((row.error for row in changed), default=0.0))
    logger.debug("%s", report.table())
    if out_path is not None:
        save_converted(model, tokenizer, report, out_path, overwrite=overwrite)
    return model, report



def _empty_model(config: SelectiveLlamaConfig, dtype: torch.dtype, state: dict) -> SelectiveLlamaForCausalLM:
    """The model skeleton on the meta device (no random init); only the RoPE buffers are built for real."""
    device = next(iter(state.values())).device
    with torch.device("meta"):
        model = SelectiveLlamaForCausalLM(config)
    rotary = type(model.model.rotary_emb)
    with torch.device(device):
        model.model.rotary_emb = rotary(config=config)
    return model


def _converted_state_dict(source_model, reports: list[LayerReport], origins, source_counts) -> dict:
    state = dict(source_model.state_dict())
    modules = _attention_of_layers(source_model)
    for row in reports:
        if row.method == "keep":
            continue
        module = modules[row.layer]
        prefix = next(name for name, m in source_model.named_modules() if m is module)
        head_dim = module.head_dim
        groups = _query_groups(_source_layout(source_model.config)[1][row.layer], source_counts[row.layer])
        weights = torch.tensor([float(len(g)) for g in groups])
        for projection in ("k_proj", "v_proj"):
            for kind in ("weight", "bias"):
                key = f"{prefix}.{projection}.{kind}"
                if key not in state:
                    continue
                tensor = state[key]
                if row.method == "duplicate":
                    state[key] = _copy_rows(tensor, head_dim, [origin[0] for origin in origins[row.layer]])
                else:
                    state[key] = _merge_rows(tensor, head_dim, origins[row.layer], weights)
    return state


def save_converted(model, tokenizer, report: ConversionReport, out_path: Path, overwrite: bool = False) -> Path:
    """Write checkpoint + tokenizer + report into a temporary sibling folder, then move it to `out_path`."""
    out_path = Path(out_path).expanduser()
    if out_path.exists() and not overwrite:
        raise ValueError(f"{out_path} already exists; pass overwrite=True (--overwrite) to replace it")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.partial-", dir=out_path.parent))
    try:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        (staging / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2))
        backup = None
        if out_path.exists():
            backup = out_path.with_name(f".{out_path.name}.old-{os.getpid()}")
            os.replace(out_path, backup)
        os.replace(staging, out_path)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("wrote %s", out_path)
    return out_path

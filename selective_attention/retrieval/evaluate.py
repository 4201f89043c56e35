"""Needle-in-a-haystack grid with optional head masks (the masking experiments of the Retrieval_Head paper).

One JSON file per test point, in the layout of gkamradt/LLMTest_NeedleInAHaystack (model, context_length,
depth_percent, needle, model_response, score, ...) plus the masked heads and the ablation mode; a point whose
file exists is not run again, so an interrupted grid resumes. Score: ROUGE-1 recall x 100 of the needle
sentence in the answer (as the reference scores it), or of the expected answer with `score_against="answer"`.
Masks hold at prefill and decode. With `kv_cache="headwise"` every trial decodes through a head-wise KV cache
(`selective_attention.cache`): the top (or seeded random) KV heads keep the whole context, the others sink + window.
Under `accelerate launch` the missing points are split over the processes (`selective_attention.distributed.sharding`); each
point is its own file, so the folder is the one a single process writes.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from tqdm.auto import tqdm

from selective_attention.cache.headwise import attach_headwise, parse_full, trial_cache
from selective_attention.cache.selection import headwise_policy
from selective_attention.distributed.sharding import Shard, current_shard
from selective_attention.heads.ids import Head, head_key, validate_heads
from selective_attention.heads.masking import mask_heads
from selective_attention.heads.scores import load_checked_head_scores
from selective_attention.heads.selection import select_heads
from selective_attention.loading.quantization import describe_model
from selective_attention.modeling import text_config
from selective_attention.retrieval.config import KV_CACHES, SCORE_TARGETS, NeedleConfig  # noqa: F401 (public here too)
from selective_attention.retrieval.detect import reuse_order
from selective_attention.retrieval.generate import SharedPrefix, greedy_decode, stop_token_ids
from selective_attention.retrieval.haystack import (
    Haystack,
    NeedlePrompt,
    build_prompt,
    check_length,
    prompt_template,
)
from selective_attention.retrieval.languages import get_language
from selective_attention.retrieval.needles import Needle
from selective_attention.retrieval.tracking import log_trial

logger = logging.getLogger(__name__)

MANIFEST = "run.json"


def resolve_mask(spec: str | None, num_layers: int, num_heads: int, head_scores: str | Path | None = None,
                 seed: int = 0) -> list[Head]:
    """Heads named by `spec`; top/bottom/random need a head-score file, checked against the model's shape."""
    if not spec:
        return []
    kind = spec.partition(":")[0]
    scores = None
    if kind in ("top", "bottom", "random"):
        if head_scores is None:
            raise ValueError(f"mask {spec!r} needs --head-scores FILE (from `selective-attention detect`)")
        scores = load_checked_head_scores(head_scores, num_layers, num_heads)
    elif ":" in spec:
        raise ValueError(f"unknown mask spec {spec!r}: expected top:K, bottom:K, random:K or 'L-H,L-H'")
    heads = select_heads(scores, spec, seed=seed, num_layers=num_layers, num_heads=num_heads)
    validate_heads(heads, num_layers, num_heads)
    return heads


def point_path(output_dir: Path, length: int, depth: float, needle: Needle) -> Path:
    return output_dir / f"len_{length}_depth_{int(round(depth * 100))}_{needle.name}_results.json"


def _write_json(path: Path, payload: dict) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(payload, indent=2), encoding="utf-8")
    partial.replace(path)


def _check_manifest(output_dir: Path, manifest: dict) -> None:
    """Refuse to mix two configurations (another model or mask) in one results folder."""
    path = output_dir / MANIFEST
    if not path.exists():
        return
    theirs = json.loads(path.read_text(encoding="utf-8"))
    for field_name in ("model", "masked_heads", "mask_mode", "language", "haystack_language", "kv_cache"):
        if theirs.get(field_name, "en" if "language" in field_name else None) != manifest[field_name]:
            raise ValueError(f"{output_dir} holds results with {field_name}={theirs.get(field_name)!r}, this run has "
                             f"{manifest[field_name]!r}; use another --output (nothing was overwritten)")


def run_needle_grid(model, tokenizer, config: NeedleConfig, output_dir: str | Path, model_name: str | None = None,
                    label: str | None = None, progress: bool = True, tracker=None, shard: Shard | None = None
                    ) -> list[dict]:
    """Run every missing point of the grid; returns all points' results (old and new). `tracker` (see
    `selective_attention.retrieval.tracking`) receives the manifest and every new point's score. `shard` (default: this
    process's place under `accelerate launch`): each process runs its chunk of the missing points."""
    shard = shard if shard is not None else current_shard()
    text = text_config(model)
    num_layers, num_heads = text.num_hidden_layers, text.num_attention_heads
    heads = resolve_mask(config.mask, num_layers, num_heads, config.head_scores, config.seed)
    policy = None if config.kv_cache == "dynamic" else headwise_policy(
        model, config.head_scores, full=parse_full(config.full_kv_heads), sink=config.sink, window=config.window,
        method=config.kv_select, seed=config.seed)
    kv_cache = None if policy is None else {**policy.to_dict(), "select": config.kv_select,
                                            "full_kv_heads": config.full_kv_heads, "describe": policy.describe()}
    model_name = model_name or getattr(model, "name_or_path", None) or type(model).__name__
    output_dir = Path(output_dir)
    manifest = {"model": model_name, "masked_heads": [head_key(*h) for h in heads],
                "mask_mode": config.mask_mode if heads else None, "mask": config.mask, "seed": config.seed,
                "head_scores": str(config.head_scores) if config.head_scores else None,
                "label": label or _kv_label(config, policy, _default_label(config, heads)),
                "settings": _settings(config),
                "language": config.language, "haystack_language": config.haystack_language,
                "quantization": describe_model(model), "kv_cache": kv_cache}
    if output_dir.exists():
        _check_manifest(output_dir, manifest)

    hay_language = get_language(config.haystack_language)
    haystack = Haystack(tokenizer, hay_language.haystack_text(config.haystack), min_tokens=max(config.lengths),
                        language=hay_language)
    prompts: list[NeedlePrompt] = []
    for needle in config.needles:
        template = prompt_template(tokenizer, needle.question, chat=config.chat, language=config.language)
        for length in config.lengths:
            for depth in config.depths:
                prompt = build_prompt(haystack, template, needle, length, depth)
                check_length(model, len(prompt.input_ids), config.max_new_tokens, length)
                prompts.append(prompt)
    if shard.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        _write_json(output_dir / MANIFEST, manifest)
    pending = [p for p in prompts
               if not point_path(output_dir, p.requested_length, p.depth_percent, p.needle).exists()]
    done = len(prompts) - len(pending)
    shard.wait()  # every process has listed the missing points before any writes one
    pending = shard.split(reuse_order(pending))
    if tracker is not None:
        tracker.log_config(manifest)
    logger.info("%d points, %d to run, %d heads masked (%s)", len(prompts), len(pending), len(heads),
                manifest["mask_mode"])
    stop_ids = stop_token_ids(tokenizer, model)
    if pending:
        handle = mask_heads(model, heads, mode=config.mask_mode) if heads else None
        headwise = attach_headwise(model, policy) if policy is not None else None
        try:
            # Mean ablation keeps running state along the sequence, so it cannot start from a shared cache.
            reuse = config.reuse_prefix and not (heads and config.mask_mode == "mean")
            shared = SharedPrefix(model, pending) if reuse else None
            for prompt in tqdm(pending, desc="needle", disable=not progress):
                started = time.perf_counter()
                cache, cached = shared.start(prompt) if shared is not None else (None, 0)
                if policy is not None:
                    cache, cached = trial_cache(model, policy, cache, cached, prompt.input_ids, config.prefill_chunk)
                decoded = greedy_decode(model, prompt.input_ids, stop_ids=stop_ids,
                                        max_new_tokens=config.max_new_tokens, cache=cache, cached_length=cached)
                response = tokenizer.decode(decoded.tokens, skip_special_tokens=True).strip()
                target = prompt.needle.needle if config.score_against == "needle" else prompt.needle.answer
                score = round(100 * get_language(config.language).rouge1_recall(target, response), 2)
                result = {
                    "model": model_name,
                    "context_length": prompt.requested_length,
                    "depth_percent": prompt.depth_percent,
                    "version": 1,
                    "needle": prompt.needle.needle,
                    "model_response": response,
                    "score": score,
                    "test_duration_seconds": round(time.perf_counter() - started, 3),
                    "test_timestamp_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S%z"),
                    "question": prompt.needle.question,
                    "needle_name": prompt.needle.name,
                    "actual_depth": prompt.actual_depth,
                    "prompt_tokens": len(prompt.input_ids),
                    "score_against": config.score_against,
                    "masked_heads": manifest["masked_heads"],
                    "mask_mode": manifest["mask_mode"],
                    "kv_cache": kv_cache["describe"] if kv_cache else "dynamic",
                }
                _write_json(point_path(output_dir, prompt.requested_length, prompt.depth_percent, prompt.needle),
                            result)
                logger.info("len %d depth %g: %.0f %r", result["context_length"], result["depth_percent"], score,
                            response[:80])
                if tracker is not None:
                    log_trial(tracker, result, step=done, prefix="needle")
                    done += 1
        finally:
            if headwise is not None:
                headwise.remove()
            if handle is not None:
                handle.remove()
    shard.wait()
    return load_results(output_dir)


def _settings(config: NeedleConfig) -> dict:
    data = asdict(config)
    data["needles"] = [n.to_dict() for n in config.needles]
    return data


def _default_label(config: NeedleConfig, heads: list[Head]) -> str:
    if not heads:
        return "no mask"
    spec = config.mask or ""
    name = spec if spec.partition(":")[0] in ("top", "bottom", "random") else f"{len(heads)} heads"
    if spec.startswith("random"):
        name += f" (seed {config.seed})"
    return f"{name} masked ({config.mask_mode})"


def _kv_label(config: NeedleConfig, policy, mask_label: str) -> str:
    if policy is None:
        return mask_label
    total = policy.num_layers * policy.num_kv_heads
    kv = f"{policy.num_full}/{total} KV heads full ({config.kv_select}), sink {policy.sink} + window {policy.window}"
    return kv if mask_label == "no mask" else f"{kv}; {mask_label}"


def load_results(output_dir: str | Path) -> list[dict]:
    """Every test-point JSON in a results folder."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise FileNotFoundError(f"results folder {output_dir} does not exist")
    return [json.loads(path.read_text(encoding="utf-8")) for path in sorted(output_dir.glob("*_results.json"))]


def load_manifest(output_dir: str | Path) -> dict:
    path = Path(output_dir) / MANIFEST
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


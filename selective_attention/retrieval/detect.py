"""Retrieval-head detection (Wu et al., nightdessert/Retrieval_Head), for any causal LM.

Per trial (context length x depth x needle): greedy answer; for every generated token and every query head, the
key the head attends to most from the row that produced the token; the head gains 1/len(needle span) when that
key lies inside the needle and holds the token just generated. The trial counts only if the answer's ROUGE-1
recall of the needle exceeds 0.5; a head's entry in `head_scores.json` is the list of its scores over counted
trials (Retrieval_Head format). Heads are query heads, after KV expansion.

Two methods, identical scores:
- ``probe`` (default): SDPA decoding through `sa_probe`, which records the argmax of the last row of each forward
  call (O(L) memory), with the KV cache of the tokens every trial shares (template header + haystack before the
  needle) computed once and cropped per trial, and trials of one prompt length decoded as one batch;
- ``reference``: eager decoding step by step with `output_attentions=True`, as the reference does.

Trials are keyed by (length, depth, needle); results are rewritten atomically after every trial, so an
interrupted run resumes where it stopped and reruns merge into the same file. Under `accelerate launch` the
pending trials are split over the processes (see `selective_attention.distributed.sharding`); the merged file is the one a
single process writes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from selective_attention.attention.probe import probing
from selective_attention.distributed.sharding import Shard, current_shard, write_part
from selective_attention.heads.ids import head_key
from selective_attention.heads.scores import load_sidecar
from selective_attention.loading.quantization import describe_model
from selective_attention.modeling import text_config
from selective_attention.retrieval.batched import batch_groups, decode_batch
from selective_attention.retrieval.config import METHODS, DetectConfig  # noqa: F401 (public here too)
from selective_attention.retrieval.generate import SharedPrefix, reference_decode, stop_token_ids
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
from selective_attention.retrieval.trial_store import assemble, existing_records, fold_parts, write_records  # noqa: F401 (assemble: public)

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


def trial_key(length: int, depth: float, needle: Needle) -> str:
    return f"{int(length)}|{float(depth):g}|{needle.name}"


def retrieval_scores(argmax: torch.Tensor, answer: list[int], prompt_ids: list[int],
                     span: tuple[int, int]) -> dict[str, float]:
    """Per-head retrieval score of one trial as the reference accumulates it, sparse ({"L-H": score > 0}).

    `argmax`: (steps, layers, heads) key indices; step t belongs to generated token `answer[t]`.
    """
    start, end = span
    argmax = argmax.cpu()
    tokens = torch.tensor(prompt_ids, dtype=torch.long)
    inside = (argmax >= start) & (argmax < end)
    at_key = tokens[argmax.clamp(max=len(prompt_ids) - 1)]
    hits = inside & (at_key == torch.tensor(answer[: argmax.shape[0]], dtype=torch.long)[:, None, None])
    counts = hits.sum(dim=0)
    scores: dict[str, float] = {}
    for layer, head in torch.nonzero(counts).tolist():
        total = 0.0
        for _ in range(int(counts[layer, head])):  # repeated addition, as the reference does
            total += 1 / (end - start)
        scores[head_key(layer, head)] = total
    return scores


@dataclass
class DetectResult:
    scores: dict[str, list[float]]
    meta: dict
    new_trials: int = 0
    seconds: float = 0.0
    records: list[dict] = field(default_factory=list)


def plan(tokenizer, config: DetectConfig) -> tuple[Haystack, list[NeedlePrompt]]:
    """Every prompt of the grid (lengths x depths x needles)."""
    hay_language = get_language(config.haystack_language)
    haystack = Haystack(tokenizer, hay_language.haystack_text(config.haystack), min_tokens=max(config.lengths),
                        language=hay_language)
    prompts = []
    for needle in config.needles:
        template = prompt_template(tokenizer, needle.question, chat=config.chat, language=config.language)
        for length in config.lengths:
            for depth in config.depths:
                prompts.append(build_prompt(haystack, template, needle, length, depth))
    return haystack, prompts


def _check_languages(output: Path | None, config: DetectConfig) -> None:
    """Refuse to merge trials of another language pair into an existing file."""
    meta = load_sidecar(output) if output is not None and output.exists() else None
    if not meta:
        return
    settings = meta.get("settings", {})
    theirs = (settings.get("language", "en"), settings.get("haystack_language") or settings.get("language", "en"))
    if theirs != (config.language, config.haystack_language):
        raise ValueError(f"{output} holds {theirs[0]} needles in a {theirs[1]} haystack; this run is "
                         f"{config.language} in {config.haystack_language}: choose another output (nothing was "
                         "overwritten)")


def reuse_order(prompts: list[NeedlePrompt]) -> list[NeedlePrompt]:
    """Prompts sorted by template header, length, needle and depth: contiguous chunks of this list (one per process)
    share a header and the haystack's start, so each process keeps its shared-prefix reuse, and trials of one
    length and needle (one decode batch) stay together."""
    return sorted(prompts, key=lambda p: (p.input_ids[: p.header_length], p.requested_length,
                                          p.needle.name, p.depth_percent))


def detect(model, tokenizer, config: DetectConfig, output: str | Path | None = None,
           model_name: str | None = None, progress: bool = True, tracker=None, shard: Shard | None = None
           ) -> DetectResult:
    """Run the grid's missing trials and (re)write `output` (head_scores.json + sidecar) after each one.

    `tracker` (a `selective_attention.retrieval.tracking.Tracker`) receives the config and every new trial's scalars.
    `shard` (default: this process's place under `accelerate launch`): with several processes each runs its chunk
    of the pending trials and writes its own part file; the main process merges them into `output`, and every
    process returns the merged result."""
    started = time.perf_counter()
    shard = shard if shard is not None else current_shard()
    text = text_config(model)
    num_layers, num_heads = text.num_hidden_layers, text.num_attention_heads
    model_name = model_name or getattr(model, "name_or_path", None) or type(model).__name__
    output = Path(output) if output is not None else None
    if shard.sharded and output is None:
        raise ValueError("a sharded run (several processes) needs an output file to merge into")
    _check_languages(output, config)
    _, prompts = plan(tokenizer, config)
    for prompt in prompts:
        check_length(model, len(prompt.input_ids), config.max_new_tokens, prompt.requested_length)
    meta = {"format_version": FORMAT_VERSION, "model": model_name, "num_layers": num_layers, "num_heads": num_heads,
            "num_key_value_heads": getattr(text, "num_key_value_heads", num_heads), "settings": config.settings(),
            "rouge": f"rouge-score rouge1 recall of the needle, {_rouge_note(config.language)}",
            "language": config.language, "haystack_language": config.haystack_language,
            "quantization": describe_model(model)}
    part_meta = dict(meta)  # written into each part before `meta` collects the trials
    if shard.is_main and output is not None:
        fold_parts(output, meta, model_name, num_layers, num_heads)  # what an interrupted sharded run left
    shard.wait()
    records = existing_records(output, model_name, num_layers, num_heads)
    pending = [p for p in prompts if trial_key(p.requested_length, p.depth_percent, p.needle) not in records]
    mine = shard.split(reuse_order(pending))
    logger.info("%d trials in the grid, %d already done, %d to run (%s)%s", len(prompts), len(prompts) - len(pending),
                len(pending), config.method, f", {len(mine)} in process {shard.rank}" if shard.sharded else "")
    if tracker is not None:
        tracker.log_config({key: value for key, value in meta.items() if key != "trials"})
    stop_ids = stop_token_ids(tokenizer, model)
    new_records: list[dict] = []
    done = len(records)
    if mine:
        run = _probe_trials if config.method == "probe" else _reference_trials
        for prompt, decoded, seconds in run(model, mine, stop_ids, config, progress):
            record = _record(tokenizer, prompt, decoded, seconds, config)
            new_records.append(record)
            if shard.sharded:
                write_part(output, shard.rank, new_records, part_meta)
            else:
                records[record["key"]] = record
                write_records(output, records, meta, num_layers, num_heads)
            if tracker is not None:
                log_trial(tracker, record, step=done + len(new_records) - 1)
    if shard.sharded:
        shard.wait()
        if shard.is_main:
            fold_parts(output, meta, model_name, num_layers, num_heads)
        shard.wait()
        records = existing_records(output, model_name, num_layers, num_heads)
    scores = write_records(output if shard.is_main else None, records, meta, num_layers, num_heads)
    return DetectResult(scores, meta, len(new_records), time.perf_counter() - started, new_records)


def _rouge_note(language: str) -> str:
    segmenter = get_language(language).segmenter
    return {"stem": "stemmed", "jieba": "jieba word segmentation", "words": "Unicode words, not stemmed",
            "chars": "CJK characters"}.get(segmenter, segmenter)


def _record(tokenizer, prompt: NeedlePrompt, decoded, seconds: float, config: DetectConfig) -> dict:
    response = tokenizer.decode(decoded.tokens, skip_special_tokens=True).strip()
    recall = get_language(config.language).rouge1_recall(prompt.needle.needle, response)
    counted = recall > config.rouge_threshold
    scores = retrieval_scores(decoded.argmax, decoded.tokens, prompt.input_ids, prompt.needle_span)
    record = {
        "key": trial_key(prompt.requested_length, prompt.depth_percent, prompt.needle),
        "context_length_requested": prompt.requested_length,
        "context_length": prompt.context_length,
        "prompt_tokens": len(prompt.input_ids),
        "depth_percent": prompt.depth_percent,
        "actual_depth": prompt.actual_depth,
        "needle": prompt.needle.name,
        "needle_span": list(prompt.needle_span),
        "response": response,
        "response_ids": decoded.tokens,
        "rouge1_recall": recall,
        "counted": counted,
        "scores": scores,
        "method": config.method,
        "seconds": round(seconds, 3),
    }
    if config.save_inputs:
        record["input_ids"] = prompt.input_ids
    logger.info("len %d depth %g needle %s: rouge %.2f%s, %d heads hit, %.1fs: %r", prompt.requested_length,
                prompt.depth_percent, prompt.needle.name, recall, "" if counted else " (not counted)", len(scores),
                seconds, response[:80])
    return record


def _probe_trials(model, prompts: list[NeedlePrompt], stop_ids, config: DetectConfig, progress: bool):
    """Probe decoding; trials share the KV cache of their common prefix (same header, haystack before needle), and
    trials of one prompt length decode together. Yields (prompt, decoded, seconds: the group's time / its size)."""
    shared = SharedPrefix(model, prompts) if config.reuse_prefix else None
    with tqdm(total=len(prompts), desc="detect (probe)", disable=not progress) as bar, \
            probing(model, rows=1) as recorder:
        for group in batch_groups(prompts, config.decode_batch):
            start = time.perf_counter()
            answers = decode_batch(model, group, stop_ids=stop_ids, max_new_tokens=config.max_new_tokens,
                                   shared=shared, recorder=recorder)
            seconds = (time.perf_counter() - start) / len(group)
            for prompt, decoded in zip(group, answers):
                yield prompt, decoded, seconds
            bar.update(len(group))


def _reference_trials(model, prompts: list[NeedlePrompt], stop_ids, config: DetectConfig, progress: bool):
    for prompt in tqdm(prompts, desc="detect (reference)", disable=not progress):
        start = time.perf_counter()
        decoded = reference_decode(model, prompt.input_ids, stop_ids=stop_ids, max_new_tokens=config.max_new_tokens)
        yield prompt, decoded, time.perf_counter() - start

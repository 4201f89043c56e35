"""Retrieval-head detection (Wu et al., nightdessert/Retrieval_Head), for any causal LM.

Per trial (context length x depth x needle): greedy answer; for every generated token and every query head, the
key the head attends to most from the row that produced the token; the head gains 1/len(needle span) when that
key lies inside the needle and holds the token just generated. The trial counts only if the answer's ROUGE-1
recall of the needle exceeds 0.5; a head's entry in `head_scores.json` is the list of its scores over counted
trials (Retrieval_Head format). Heads are query heads, after KV expansion.

Two methods, identical scores:
- ``probe`` (default): SDPA decoding through `sa_probe`, which records the argmax of the last row of each forward
  call (O(L) memory), with the KV cache of the tokens every trial shares (template header + haystack before the
  needle) computed once and cropped per trial;
- ``reference``: eager decoding step by step with `output_attentions=True`, as the reference does.

Trials are keyed by (length, depth, needle); results are rewritten atomically after every trial, so an
interrupted run resumes where it stopped and reruns merge into the same file.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..attention.probe import probing
from ..heads import head_key, load_head_scores, load_sidecar, save_head_scores, sidecar_path
from ..modeling import text_config
from .generate import SharedPrefix, greedy_decode, reference_decode, stop_token_ids
from .haystack import Haystack, NeedlePrompt, build_prompt, check_grid, check_length, load_haystack_text, prompt_template
from .needles import Needle
from ..languages import get_language
from ..quantization import describe_model

logger = logging.getLogger(__name__)

METHODS = ("probe", "reference")
FORMAT_VERSION = 1


@dataclass
class DetectConfig:
    """A detection grid and how to run it. `rouge_threshold` is the counting criterion (0.5 in the reference;
    tests on random models lower it to count every trial)."""

    lengths: list[int]
    depths: list[float]
    needles: list[Needle]
    method: str = "probe"
    max_new_tokens: int = 48
    rouge_threshold: float = 0.5
    save_inputs: bool = False
    haystack: str | None = None
    chat: bool | None = None
    reuse_prefix: bool = True
    language: str = "en"  # needle, question and ROUGE language
    haystack_language: str | None = None  # None: same as `language`; another one: cross-lingual retrieval

    def __post_init__(self) -> None:
        self.language = get_language(self.language).code
        self.haystack_language = get_language(self.haystack_language or self.language).code
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; expected one of {', '.join(METHODS)}")
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        self.lengths, self.depths = check_grid(self.lengths, self.depths, self.needles)

    def settings(self) -> dict:
        data = asdict(self)
        data["needles"] = [n.to_dict() for n in self.needles]
        return data


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


def _existing(output: Path | None, model_name: str, num_layers: int, num_heads: int) -> dict[str, dict]:
    """Trial records already in `output` (empty when it does not exist); refuses another model's file."""
    if output is None or not output.exists():
        return {}
    load_head_scores(output)  # valid format
    meta = load_sidecar(output)
    if meta is None or "trials" not in meta:
        raise ValueError(f"{output} exists but {sidecar_path(output).name} with its trial records does not; "
                         "choose another output path (nothing was overwritten)")
    theirs = (meta.get("num_layers"), meta.get("num_heads"))
    if theirs != (num_layers, num_heads):
        raise ValueError(f"{output} holds scores of {meta.get('model')} ({theirs[0]} layers x {theirs[1]} heads); "
                         f"this model has {num_layers} x {num_heads} (nothing was overwritten)")
    if meta.get("model") != model_name:
        logger.warning("merging into %s, made with model %s (now %s)", output, meta.get("model"), model_name)
    return {record["key"]: record for record in meta["trials"]}


def _sort_key(record: dict) -> tuple:
    return (record["context_length_requested"], record["depth_percent"], record["needle"])


def assemble(records: dict[str, dict], num_layers: int, num_heads: int) -> dict[str, list[float]]:
    """The Retrieval_Head lists: per head, its score in every counted trial, trials in grid order."""
    counted = [r for r in sorted(records.values(), key=_sort_key) if r["counted"]]
    return {head_key(layer, head): [r["scores"].get(head_key(layer, head), 0.0) for r in counted]
            for layer in range(num_layers) for head in range(num_heads)}


def _write(output: Path | None, records: dict[str, dict], meta: dict, num_layers: int, num_heads: int) -> dict:
    scores = assemble(records, num_layers, num_heads)
    meta["trials"] = sorted(records.values(), key=_sort_key)
    meta["counted_trials"] = sum(1 for r in records.values() if r["counted"])
    if output is not None:
        save_head_scores(output, scores, meta)
    return scores


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
                prompt = build_prompt(haystack, template, needle, length, depth)
                prompt.extra["header_length"] = len(template.header_ids)
                prompt.extra["length"] = length
                prompts.append(prompt)
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


def detect(model, tokenizer, config: DetectConfig, output: str | Path | None = None,
           model_name: str | None = None, progress: bool = True, tracker=None) -> DetectResult:
    """Run the grid's missing trials and (re)write `output` (head_scores.json + sidecar) after each one.

    `tracker` (a `selective_attention.tracking.Tracker`) receives the config and every new trial's scalars."""
    started = time.perf_counter()
    text = text_config(model)
    num_layers, num_heads = text.num_hidden_layers, text.num_attention_heads
    model_name = model_name or getattr(model, "name_or_path", None) or type(model).__name__
    output = Path(output) if output is not None else None
    records = _existing(output, model_name, num_layers, num_heads)
    _check_languages(output, config)
    _, prompts = plan(tokenizer, config)
    for prompt in prompts:
        check_length(model, len(prompt.input_ids), config.max_new_tokens, prompt.extra["length"])
    pending = [p for p in prompts if trial_key(p.extra["length"], p.depth_percent, p.needle) not in records]
    logger.info("%d trials in the grid, %d already done, %d to run (%s)", len(prompts), len(prompts) - len(pending),
                len(pending), config.method)
    meta = {"format_version": FORMAT_VERSION, "model": model_name, "num_layers": num_layers, "num_heads": num_heads,
            "num_key_value_heads": getattr(text, "num_key_value_heads", num_heads), "settings": config.settings(),
            "rouge": f"rouge-score rouge1 recall of the needle, {_rouge_note(config.language)}",
            "language": config.language, "haystack_language": config.haystack_language,
            "quantization": describe_model(model)}
    if tracker is not None:
        tracker.log_config({key: value for key, value in meta.items() if key != "trials"})
    stop_ids = stop_token_ids(tokenizer, model)
    new_records = []
    if pending:
        run = _probe_trials if config.method == "probe" else _reference_trials
        for prompt, decoded, seconds in run(model, pending, stop_ids, config, progress):
            record = _record(tokenizer, prompt, decoded, seconds, config)
            records[record["key"]] = record
            new_records.append(record)
            _write(output, records, meta, num_layers, num_heads)
            if tracker is not None:
                from ..tracking import log_trial

                log_trial(tracker, record, step=len(records) - 1)
    scores = _write(output, records, meta, num_layers, num_heads)
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
        "key": trial_key(prompt.extra["length"], prompt.depth_percent, prompt.needle),
        "context_length_requested": prompt.extra["length"],
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
    logger.info("len %d depth %g needle %s: rouge %.2f%s, %d heads hit, %.1fs: %r", prompt.extra["length"],
                prompt.depth_percent, prompt.needle.name, recall, "" if counted else " (not counted)", len(scores),
                seconds, response[:80])
    return record


def _probe_trials(model, prompts: list[NeedlePrompt], stop_ids, config: DetectConfig, progress: bool):
    """Probe decoding; trials share the KV cache of their common prefix (same header, haystack before needle)."""
    shared = SharedPrefix(model, prompts) if config.reuse_prefix else None
    for prompt in tqdm(prompts, desc="detect (probe)", disable=not progress):
        start = time.perf_counter()
        cache, cached = shared.start(prompt) if shared is not None else (None, 0)
        with probing(model, rows=1) as recorder:
            decoded = greedy_decode(model, prompt.input_ids, stop_ids=stop_ids, max_new_tokens=config.max_new_tokens,
                                    cache=cache, cached_length=cached, recorder=recorder)
        yield prompt, decoded, time.perf_counter() - start


def _reference_trials(model, prompts: list[NeedlePrompt], stop_ids, config: DetectConfig, progress: bool):
    for prompt in tqdm(prompts, desc="detect (reference)", disable=not progress):
        start = time.perf_counter()
        decoded = reference_decode(model, prompt.input_ids, stop_ids=stop_ids, max_new_tokens=config.max_new_tokens)
        yield prompt, decoded, time.perf_counter() - start

"""Passkey retrieval under the tree kernel, with the Landmark Attention / Quest prompt.

A 5-digit pass key sits at a depth of repeated filler text. The prompt is prefilled densely except its last part
(by default the final question), which is decoded token by token under the tree kernel; then the answer is decoded
greedily under the tree kernel too. One dense prefill serves every configuration: each starts from a fresh cache
holding that prefix.
"""

from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm
from transformers import DynamicCache

from selective_attention.modeling import cache_kwargs
from selective_attention.retrieval.generate import cropped
from selective_attention.tree_kernel.attention import configure_tree_kernel
from selective_attention.tree_kernel.config import TreeKernelConfig

logger = logging.getLogger(__name__)

# Landmark Attention's passkey prompt (Mohtashami & Jaggi 2023), as Quest uses it
TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
        "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"


@dataclass
class PasskeyPrompt:
    ids: torch.Tensor  # (T,)
    key: str
    depth: float
    tail: int  # last tokens decoded under the tree kernel (the question)


def passkey_text(repeats_before: int, repeats_after: int, key: str, question: bool = True) -> str:
    lines = [TASK, " ".join([FILLER] * repeats_before), NEEDLE.format(key=key), " ".join([FILLER] * repeats_after)]
    return "\n".join(lines + ([QUESTION] if question else []))


def build_prompt(tokenizer, length: int, depth: float, seed: int) -> PasskeyPrompt:
    """About `length` tokens with the key after `depth` of the filler; the key is drawn from (seed, length, depth)."""
    if not 0 <= depth <= 1:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    key = str(random.Random(f"{seed}/{length}/{depth:g}").randint(10000, 99999))  # a new key per trial

    def count(text: str) -> int:
        return len(tokenizer(text).input_ids)

    fixed = count(passkey_text(0, 0, key))
    per_filler = (count(passkey_text(50, 50, key)) - fixed) / 100
    repeats = max(1, int((length - fixed) / per_filler))
    before = round(depth * repeats)
    text = passkey_text(before, repeats - before, key)
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    tail = ids.numel() - count(passkey_text(before, repeats - before, key, question=False))
    return PasskeyPrompt(ids, key, depth, max(1, tail))


def answer_key(text: str) -> str | None:
    """The first run of digits in the model's answer."""
    match = re.search(r"\d+", text)
    return match.group(0) if match else None


def _step(model: nn.Module, token: torch.Tensor, cache) -> torch.Tensor:
    return model(token.view(1, 1), **cache_kwargs(cache), use_cache=True).logits[0, -1]


def run_prompt(model: nn.Module, tokenizer, prompt: PasskeyPrompt, configs: list[tuple[str, TreeKernelConfig | None]],
               tail: int | None = None, answer_tokens: int = 8) -> dict[str, dict]:
    """For each (name, config): decode the prompt's last `tail` tokens (default: the question) and the greedy
    answer under `config` (None: dense), after one dense prefill of the rest. -> name -> answer, correct."""
    ids = prompt.ids.to(model.device)
    tail = prompt.tail if tail is None else tail
    if not 0 < tail < ids.numel():
        raise ValueError(f"tail must be in [1, {ids.numel() - 1}], got {tail}")
    prefix = ids.numel() - tail
    configure_tree_kernel(model, None)
    shared = DynamicCache(config=model.config)
    out = {}
    with torch.inference_mode():
        model(ids[None, :prefix], **cache_kwargs(shared), use_cache=True)
        for name, config in configs:
            cache = cropped(shared, prefix, model.config)  # the dense prefix, fresh for each configuration
            configure_tree_kernel(model, config)
            for token in ids[prefix:]:
                logits = _step(model, token, cache)
            answer = []
            for _ in range(answer_tokens):
                answer.append(int(logits.argmax()))
                logits = _step(model, torch.tensor(answer[-1], device=ids.device), cache)
            text = tokenizer.decode(answer, skip_special_tokens=True)
            out[name] = dict(answer=text, correct=answer_key(text) == prompt.key,
                             costs=config.stats.summary() if config is not None else None)
            if config is not None:
                config.stats.reset()
    configure_tree_kernel(model, None)
    return out


def trial_key(length: int, depth: float, seed: int) -> str:
    return f"{length}/{depth:g}/{seed}"


def passkey_grid(model: nn.Module, tokenizer, lengths: list[int], depths: list[float], seeds: list[int],
                 configs: list[tuple[str, TreeKernelConfig | None]], done: dict, on_trial=None,
                 tail: int | None = None, answer_tokens: int = 8) -> dict:
    """Every (length, depth, seed) trial not in `done` (keyed by `trial_key`), each calling `on_trial(key, row)`."""
    grid = [(length, depth, seed) for length in lengths for seed in seeds for depth in depths]
    for length, depth, seed in tqdm(grid, desc="passkey", disable=None):
        key = trial_key(length, depth, seed)
        wanted = [(name, config) for name, config in configs if name not in done.get(key, {}).get("results", {})]
        if not wanted:
            continue
        prompt = build_prompt(tokenizer, length, depth, seed)
        results = run_prompt(model, tokenizer, prompt, wanted, tail, answer_tokens)
        row = done.setdefault(key, dict(length=length, depth=depth, seed=seed, tokens=prompt.ids.numel(),
                                        tail=prompt.tail if tail is None else tail, key=prompt.key, results={}))
        row["results"].update(results)
        logger.info("%s (%d tokens, key %s): %s", key, row["tokens"], prompt.key,
                    " ".join(f"{n}={'ok' if r['correct'] else r['answer']!r}" for n, r in results.items()))
        if on_trial is not None:
            on_trial(key, row)
    return done


def accuracy(done: dict) -> dict[str, dict[str, float]]:
    """length -> configuration name -> fraction of trials answered correctly."""
    totals: dict[str, dict[str, list[int]]] = {}
    for row in done.values():
        for name, result in row["results"].items():
            totals.setdefault(str(row["length"]), {}).setdefault(name, []).append(int(result["correct"]))
    return {length: {name: sum(v) / len(v) for name, v in names.items()} for length, names in totals.items()}

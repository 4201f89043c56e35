"""Perplexity under the tree kernel, the way sparse attention is judged (Quest, Tang et al. 2024).

One long text is scored token by token (teacher-forced: every row selects its keys causally, as it would in a
decode), the first layers stay dense, and the budget is a number of keys. Rows that see no more keys than the
budget are exact, so perplexity is reported overall and on the rows past the budget, with every key-touching
cost per row (`TreeStats.summary`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn
from transformers import Cache, DynamicCache

from selective_attention.loading import assets
from selective_attention.modeling import attention_modules, cache_kwargs
from selective_attention.tree_kernel.attention import configure_tree_kernel
from selective_attention.tree_kernel.config import TreeKernelConfig

logger = logging.getLogger(__name__)

#: rows of the output projection computed at once (a full 8K x 49K logit matrix would be 1.6 GB in fp32)
LOGIT_ROWS = 512


def parse_dataset(spec: str) -> tuple[str, str | None, str, str]:
    """'name[:config]:split:column' -> (name, config, split, column)."""
    parts = spec.split(":")
    if len(parts) not in (3, 4):
        raise ValueError("--dataset must be 'name[:config]:split:column', e.g. 'emozilla/pg19:test:text'")
    return (parts[0], None, parts[1], parts[2]) if len(parts) == 3 else tuple(parts)


def load_tokens(tokenizer, text: str | None, dataset: str | None, needed: int) -> torch.Tensor:
    """(T,) token ids: the first document of `dataset` with at least `needed` tokens (one PG-19 book, as Quest
    scores), else the text file, else the embedded Paul Graham essays joined."""
    if dataset:
        from datasets import load_dataset  # optional dependency, only for --dataset

        name, config, split, column = parse_dataset(dataset)
        for index, row in enumerate(load_dataset(name, config, split=split, streaming=True)):
            ids = tokenizer(row[column], add_special_tokens=False, return_tensors="pt").input_ids[0]
            if ids.numel() >= needed:
                logger.info("%s: document %d (%d tokens)", dataset, index, ids.numel())
                return ids
        raise ValueError(f"no document of {dataset} has {needed} tokens")
    if text:
        path = Path(text)
        if not path.exists():
            raise FileNotFoundError(f"text file {path} not found")
        body = path.read_text(encoding="utf-8")
    else:
        body = "\n\n".join(p.read_text(encoding="utf-8") for p in sorted(assets.haystack_dir().glob("*.txt")))
    ids = tokenizer(body, add_special_tokens=False, return_tensors="pt").input_ids[0]
    if ids.numel() < needed:
        raise ValueError(f"text has {ids.numel()} tokens, need {needed}")
    return ids


def token_nll(model: nn.Module, ids: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
    """ids (T,) -> (T - 1,) float32 negative log-likelihood of each true next token (one forward; after the
    tokens already in `cache`, if given)."""
    with torch.inference_mode():
        hidden = model.base_model(input_ids=ids[None], use_cache=cache is not None,
                                  **cache_kwargs(cache)).last_hidden_state[0]
        head = model.get_output_embeddings()
        cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
        out = []
        for start in range(0, ids.numel() - 1, LOGIT_ROWS):
            stop = min(ids.numel() - 1, start + LOGIT_ROWS)
            logits = head(hidden[start:stop]).float()
            if cap:
                logits = torch.tanh(logits / cap) * cap
            out.append(torch.nn.functional.cross_entropy(logits, ids[start + 1:stop + 1], reduction="none"))
    return torch.cat(out).cpu()


def tail_nll(model: nn.Module, ids: torch.Tensor, config: TreeKernelConfig | None, dense_prefix: int
             ) -> torch.Tensor:
    """ids (T,) -> (T - 1 - dense_prefix,) NLL of the true next tokens after the first `dense_prefix`, which are
    prefilled densely into a cache and not scored: only the rows after them run under `config` (None: dense). A
    cheap proxy that ranks variants on a text's last rows. Leaves `config` configured."""
    configure_tree_kernel(model, None)
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model.base_model(input_ids=ids[None, :dense_prefix], use_cache=True, **cache_kwargs(cache))
    configure_tree_kernel(model, config)
    return token_nll(model, ids[dense_prefix:], cache)


def approximated_layers(model: nn.Module, dense_layers: Iterable[int]) -> tuple[int, ...]:
    """Every layer but `dense_layers` (checked against the model)."""
    layers = sorted(attention_modules(model))
    dense = set(dense_layers)
    missing = sorted(dense - set(layers))
    if missing:
        raise ValueError(f"dense layers {missing} do not exist (model has {len(layers)} layers)")
    return tuple(layer for layer in layers if layer not in dense)


def past_budget_rows(length: int, budget: int | None) -> torch.Tensor:
    """(length - 1,) bool: rows (predicting token p + 1 from p + 1 visible keys) that see more than `budget`."""
    visible = torch.arange(1, length)
    return visible > budget if budget is not None else torch.ones(length - 1, dtype=torch.bool)


def perplexity(nll: torch.Tensor, rows: torch.Tensor | None = None) -> float:
    chosen = nll if rows is None else nll[rows]
    return math.exp(float(chosen.double().mean())) if chosen.numel() else float("nan")


def evaluate(model: nn.Module, windows: list[torch.Tensor], config: TreeKernelConfig | None,
             budget: int | None, dense_prefix: int = 0) -> dict:
    """Perplexity of `config` (None: dense) over `windows` (each (T,)): overall, past the budget, costs per row,
    and the per-token NLL of every window concatenated (for cumulative curves). With `dense_prefix`, each window's
    first tokens are prefilled densely and only the rows after them are scored (`tail_nll`)."""
    configure_tree_kernel(model, config)
    start = time.perf_counter()
    nll = [tail_nll(model, ids, config, dense_prefix) if dense_prefix else token_nll(model, ids) for ids in windows]
    past = torch.cat([past_budget_rows(ids.numel(), budget)[dense_prefix:] for ids in windows])
    flat = torch.cat(nll)
    result = dict(ppl=perplexity(flat), ppl_past_budget=perplexity(flat, past), scored_tokens=flat.numel(),
                  past_budget_tokens=int(past.sum()), seconds=time.perf_counter() - start,
                  config=config.to_dict() if config is not None else dict(method="dense"),
                  costs=config.stats.summary() if config is not None else None, nll=[n.tolist() for n in nll])
    configure_tree_kernel(model, None)
    return result


def sweep(model: nn.Module, windows: list[torch.Tensor], configs: list[tuple[str, TreeKernelConfig | None, int | None]],
          done: dict, on_result: Callable[[str, dict], None], dense_prefix: int = 0) -> dict:
    """Evaluates every (name, config, budget) not in `done`, calling `on_result` after each (for resuming)."""
    for name, config, budget in configs:
        if name in done:
            logger.info("%s: already measured (resume)", name)
            continue
        done[name] = evaluate(model, windows, config, budget, dense_prefix)
        row = done[name]
        logger.info("%s: ppl %.3f, past the budget %.3f (%d tokens, %.0f s)", name, row["ppl"],
                    row["ppl_past_budget"], row["scored_tokens"], row["seconds"])
        on_result(name, row)
    return done

"""Attention maps: record the weights of chosen layers in one forward pass and draw them.

Recording goes through the registered `sa_record` function, so the model keeps its own kernels (and any head mask,
GQA layout or adapter) everywhere, and only the recorded layers materialise their q x k weights.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from transformers import PreTrainedModel  # noqa: E402

from .attention.record import NAME, RECORD_ATTRIBUTE, RecordSlot  # noqa: E402
from .masking import attention_modules, check_attention_interface, text_config  # noqa: E402

logger = logging.getLogger(__name__)
LABELLED_TOKENS = 48  # above this many tokens, axes show positions instead of token strings


@dataclass
class AttentionRecord:
    """Weights per recorded layer, (batch, query heads, queries, keys), filled by the forward pass."""

    slots: dict[int, list[RecordSlot]] = field(default_factory=dict)

    def __getitem__(self, layer: int) -> torch.Tensor:
        weights = self.slots[layer][0].weights
        if weights is None:
            raise KeyError(f"layer {layer} has not run a forward pass while recording")
        return weights

    @property
    def layers(self) -> list[int]:
        return sorted(self.slots)


@contextmanager
def record_attention(model: PreTrainedModel, layers: Iterable[int] | None = None) -> Iterator[AttentionRecord]:
    """Within the block, forward passes store the attention weights of `layers` (default: every layer)."""
    check_attention_interface(model)
    modules = attention_modules(model)
    chosen = sorted(modules) if layers is None else sorted(set(layers))
    unknown = [layer for layer in chosen if layer not in modules]
    if unknown:
        raise ValueError(f"layer(s) {unknown} out of range: the model has layers 0..{max(modules)}")
    previous = model.config._attn_implementation
    base = previous if previous != NAME else "sdpa"
    record = AttentionRecord()
    for layer, layer_modules in modules.items():
        for module in layer_modules:
            slot = RecordSlot(base, record=layer in chosen)
            setattr(module, RECORD_ATTRIBUTE, slot)
            if layer in chosen:
                record.slots.setdefault(layer, []).append(slot)
    model.set_attn_implementation(NAME)
    try:
        yield record
    finally:
        for layer_modules in modules.values():
            for module in layer_modules:
                setattr(module, RECORD_ATTRIBUTE, None)
        model.set_attn_implementation(previous)


def attention_maps(model: PreTrainedModel, tokenizer, text: str, layers: Iterable[int] | None = None,
                   chat: bool = False) -> tuple[dict[int, torch.Tensor], list[str]]:
    """{layer: (heads, q, k) weights} for one text, and its tokens as strings."""
    if chat and tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=not chat).to(model.device)
    with record_attention(model, layers) as record, torch.inference_mode():
        model(**inputs, use_cache=False)
    maps = {layer: record[layer][0].float().cpu() for layer in record.layers}
    tokens = [tokenizer.decode([i]) for i in inputs.input_ids[0].tolist()]
    return maps, tokens


def _draw(ax, weights: torch.Tensor, tokens: list[str], title: str) -> None:
    image = ax.imshow(weights.numpy(), cmap="viridis", aspect="auto", interpolation="nearest", vmin=0)
    ax.set_title(title, fontsize=9)
    if len(tokens) <= LABELLED_TOKENS:
        labels = [_printable(t) for t in tokens]
        ax.set_xticks(range(len(tokens)), labels, rotation=90, fontsize=6)
        ax.set_yticks(range(len(tokens)), labels, fontsize=6)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    return image


def _grid(panels: list[tuple[torch.Tensor, str]], tokens: list[str], path: Path, title: str) -> Path:
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    size = 4.2 if len(tokens) <= LABELLED_TOKENS else 3.2
    figure, axes = plt.subplots(rows, columns, figsize=(size * columns, size * rows), squeeze=False)
    for ax, (weights, name) in zip(axes.flat, panels):
        image = _draw(ax, weights, tokens, name)
        figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_layer(maps: dict[int, torch.Tensor], tokens: list[str], layer: int, path: Path,
               heads: Iterable[int] | None = None, label: str = "") -> Path:
    """Every (or the chosen) head of one layer, one panel each."""
    heads = range(maps[layer].shape[0]) if heads is None else heads
    return _grid([(maps[layer][h], f"layer {layer} head {h}") for h in heads], tokens, path,
                 f"Attention, layer {layer} {label}".strip())


def plot_head_across_layers(maps: dict[int, torch.Tensor], tokens: list[str], head: int, path: Path,
                            label: str = "") -> Path:
    return _grid([(maps[layer][head], f"layer {layer} head {head}") for layer in sorted(maps)], tokens, path,
                 f"Head {head} across layers {label}".strip())


def _printable(token: str) -> str:
    """Tick label for a token: control characters (newlines, byte tokens of random models) as escapes."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in token)


def plot_average(maps: dict[int, torch.Tensor], tokens: list[str], path: Path, label: str = "") -> Path:
    """Head-averaged map of each recorded layer."""
    return _grid([(maps[layer].mean(0), f"layer {layer}, mean over heads") for layer in sorted(maps)], tokens,
                 path, f"Head-averaged attention {label}".strip())


def plot_comparison(before: dict[int, torch.Tensor], after: dict[int, torch.Tensor], tokens: list[str],
                    layer: int, head: int, path: Path, labels: tuple[str, str] = ("before", "after")) -> Path:
    """One head before and after an intervention, and their difference."""
    a, b = before[layer][head], after[layer][head]
    figure, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    for ax, weights, name in ((axes[0], a, labels[0]), (axes[1], b, labels[1])):
        figure.colorbar(_draw(ax, weights, tokens, f"{name}: layer {layer} head {head}"), ax=ax, fraction=0.046)
    diff = (b - a).numpy()
    bound = max(abs(diff.min()), abs(diff.max()), 1e-6)
    image = axes[2].imshow(diff, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto", interpolation="nearest")
    axes[2].set_title(f"{labels[1]} - {labels[0]}", fontsize=9)
    axes[2].set_xlabel("key")
    axes[2].set_ylabel("query")
    figure.colorbar(image, ax=axes[2], fraction=0.046)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def layer_count(model: PreTrainedModel) -> int:
    return text_config(model).num_hidden_layers

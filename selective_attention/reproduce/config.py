"""What `reproduce` runs: the steps, and one dataclass read from YAML (recipes/reproduce.yaml) like every recipe."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from selective_attention.recipes import parse_config

STEPS = ("retrieval", "finetune", "masked_eval", "tree_ppl", "attention_map")


@dataclass
class ReproduceConfig:
    output_dir: str = "runs/reproduce"
    model: str | None = None  #: null = embedded SmolLM2
    seed: int = 0
    steps: list[str] = field(default_factory=lambda: list(STEPS))
    top_k: int = 20  #: K of the top/random/bottom masks
    mask_modes: list[str] = field(default_factory=lambda: ["zero", "uniform"])
    retrieval: dict = field(default_factory=dict)  #: needle recipe keys (detect_lengths, lengths, needles, ...)
    finetune: dict = field(default_factory=dict)  #: fine-tuning recipe keys shared by every variant
    variants: list[dict] = field(default_factory=lambda: [{"name": "original"}])  #: name + fine-tuning keys
    masked_eval: dict = field(default_factory=dict)  #: masked-eval recipe keys (counts, mask_mode, ...)
    masked_eval_orders: list[str] = field(default_factory=lambda: ["bottom", "top"])
    tree_ppl: dict = field(default_factory=dict)  #: `TreePplConfig` fields (context, windows, methods, ...)
    attention_map_text: str | None = None

    def __post_init__(self) -> None:
        unknown = [step for step in self.steps if step not in STEPS]
        if unknown:
            raise ValueError(f"unknown step(s) {unknown}; expected some of {', '.join(STEPS)}")
        names = [variant.get("name") for variant in self.variants]
        if any(not name for name in names) or len(set(names)) != len(names):
            raise ValueError(f"every variant needs a unique name, got {names}")


def load_reproduce_config(path: str | Path | None, overrides: dict | None = None) -> ReproduceConfig:
    (config,) = parse_config((ReproduceConfig,), path, values=overrides)
    return config

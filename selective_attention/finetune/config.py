"""Dataclass configs for the recipes, read from YAML; an unknown key fails fast and names itself.

A config file is a mapping whose keys are the dataclass fields; nested sections (`data`, `lora`, `training`)
are dataclasses too. `--set section.key=value` overrides (values parsed as YAML) are applied before validation.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, get_type_hints

import yaml

T = TypeVar("T")

HEADS = ("generative", "classification")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class DataConfig:
    """Where examples come from and how many of each split to use (seeded, eval and test never overlap)."""

    dataset: str | None = "nyu-mll/multi_nli"  #: hub dataset with premise/hypothesis/label (ignored if files given)
    train_file: str | None = None  #: local .jsonl/.json/.csv/.tsv; relative paths are relative to the YAML file
    eval_file: str | None = None  #: default: the train file (subsets stay disjoint)
    test_file: str | None = None  #: default: the eval file
    train_split: str = "train"
    eval_split: str = "validation_matched"
    test_split: str = "validation_matched"  #: same split as eval: disjoint subsets of it
    train_size: int | None = 500  #: null = all that is left, 0 = none
    eval_size: int | None = 50
    test_size: int | None = 0
    max_length: int = 256


@dataclass
class LoraConfigSection:
    r: int = 32
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    enabled: bool = True  #: false = full fine-tuning (small models only)


@dataclass
class TrainingConfig:
    epochs: float = 3.0
    max_steps: int = -1  #: > 0 overrides epochs
    learning_rate: float = 2e-4
    batch_size: int = 4
    eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    weight_decay: float = 0.0
    warmup_steps: float = 0  #: int = steps, float in [0, 1) = ratio of all steps (transformers 5)
    lr_scheduler_type: str = "linear"
    logging_steps: int = 5
    gradient_checkpointing: bool = False
    bf16: bool = False
    fp16: bool = False
    eval_each_epoch: bool = True  #: eval loss after every epoch (cheap); accuracy is measured at the end
    report_to: str = "none"


@dataclass
class ConvertSection:
    """Convert the model to variable-group GQA (`selective_attention.models.convert`) before fine-tuning."""

    kv_heads: str | int | list[int] | dict  #: e.g. "29:1" (last layer of SmolLM2 -> 1 KV head), "15:16", "9"
    method: str = "mean"  #: duplicate | mean | similarity
    calibration_tokens: int = 512


@dataclass
class FinetuneConfig:
    """One MNLI fine-tuning run."""

    output_dir: str
    model: str | None = None  #: HF id or local dir (a converted checkpoint works); null = embedded SmolLM2
    head: str = "generative"  #: generative (label word) | classification (AutoModelForSequenceClassification)
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    trust_remote_code: bool = False
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfigSection = field(default_factory=LoraConfigSection)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    max_new_tokens: int = 8  #: generative head: answer length when predicting
    evaluate_before: bool = True  #: accuracy before fine-tuning (the zero-shot baseline), same eval/test subsets
    merge: bool = False  #: also save the LoRA-merged model (safetensors) under output_dir/merged
    masked_heads: list[str] | str | None = None  #: heads masked during training and evaluation ("L-H" strings)
    mask_mode: str = "zero"
    convert: ConvertSection | None = None  #: convert first (saved under output_dir/converted), then fine-tune

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise ValueError(f"unknown head {self.head!r}; expected one of {', '.join(HEADS)}")


@dataclass
class MaskedEvalConfig:
    """Accuracy vs number of masked heads, heads ranked by a head-score file."""

    output_dir: str
    head_scores: str  #: Retrieval_Head-format JSON (sidecar checked when present)
    model: str | None = None  #: model dir/id, or a fine-tuning run dir (its adapter is merged) ; null = embedded
    head: str = "generative"
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    trust_remote_code: bool = False
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    split: str = "test"  #: which subset of `data` to score: eval | test
    order: str = "bottom"  #: bottom (lowest scores first, the seed's --maskbottom) | top | random
    scope: str = "global"  #: global ranking | per_layer (k heads in each of `layers`)
    layers: list[int] | None = None  #: per_layer scope: layers to mask in (default: all)
    counts: list[int] = field(default_factory=lambda: [0, 5, 10, 20, 40])
    mode: str = "zero"  #: zero | uniform | mean
    batch_size: int = 8
    max_new_tokens: int = 8

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise ValueError(f"unknown head {self.head!r}; expected one of {', '.join(HEADS)}")
        if self.order not in ("bottom", "top", "random"):
            raise ValueError(f"unknown order {self.order!r}; expected bottom, top or random")
        if self.scope not in ("global", "per_layer"):
            raise ValueError(f"unknown scope {self.scope!r}; expected global or per_layer")
        if self.split not in ("eval", "test"):
            raise ValueError(f"unknown split {self.split!r}; expected eval or test")
        if any(c < 0 for c in self.counts):
            raise ValueError(f"counts must be >= 0, got {self.counts}")


def _build(cls: type[T], values: Any, path: str) -> T:
    if not isinstance(values, dict):
        raise ValueError(f"config section {path or '<top>'} must be a mapping, got {type(values).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        where = ", ".join(f"{path}{key}" for key in unknown)
        raise ValueError(f"unknown config key(s) {where}; known keys{' in ' + path[:-1] if path else ''}: "
                         f"{', '.join(sorted(names))}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        optional = [arg for arg in getattr(hint, "__args__", ()) if dataclasses.is_dataclass(arg)]
        if optional and value is not None:  # `Section | None`
            hint = optional[0]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{path}{name}.")
        else:
            kwargs[name] = value
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"config lacks required key(s) {', '.join(path + m for m in missing)}")
    return cls(**kwargs)


def apply_overrides(values: dict, overrides: list[str] | None) -> dict:
    """`["training.epochs=1", "data.train_size=8"]` -> nested updates (values parsed as YAML scalars)."""
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"malformed override {item!r}: expected KEY=VALUE, e.g. training.epochs=1")
        *parents, leaf = key.split(".")
        target = values
        for part in parents:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ValueError(f"override {item!r}: {part} is not a section")
        target[leaf] = yaml.safe_load(raw)
    return values


def _resolve_files(data: DataConfig, base: Path) -> None:
    for name in ("train_file", "eval_file", "test_file"):
        value = getattr(data, name)
        if value and not os.path.isabs(value):
            setattr(data, name, str((base / value).resolve()))


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None,
                values: dict | None = None) -> T:
    """Build `cls` from a YAML file (and/or a dict) plus overrides; unknown keys are a ValueError."""
    merged: dict = {}
    base = Path.cwd()
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {path} must hold a mapping")
        merged.update(loaded)
        base = path.resolve().parent
    if values:
        merged.update(values)
    merged = apply_overrides(merged, overrides)
    config = _build(cls, merged, "")
    data = getattr(config, "data", None)
    if isinstance(data, DataConfig):
        _resolve_files(data, base)
    return config


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)

"""The NLI recipes' own arguments: what `TrainingArguments` and peft's `LoraConfig` do not cover.

Fine-tuning parses (ModelArguments, DataArguments, FinetuneArguments, TrainingArguments); masked evaluation
(ModelArguments, DataArguments, MaskedEvalArguments). Same data settings and seed -> the same eval/test subsets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from transformers import TrainingArguments

from selective_attention.attention.masked import MASK_MODES
from selective_attention.gqa.convert import METHODS as CONVERT_METHODS
from selective_attention.loading.loader import DTYPES
from selective_attention.recipes.parsing import CheckedArguments, YamlMapping

HEADS = ("generative", "classification")
SPLITS = ("eval", "test")
ORDERS = ("bottom", "top", "random")
SCOPES = ("global", "per_layer")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: peft.LoraConfig keywords a config's `lora` mapping is laid over (seed 000's r=32, alpha=16 on every projection).
DEFAULT_LORA = {"r": 32, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": list(LORA_TARGETS)}


@dataclass
class ModelArguments(CheckedArguments):
    """Which model to load and with which NLI head."""

    model: str | None = field(default=None, metadata={
        "help": "HF id or local dir (a converted checkpoint, or a fine-tuning run dir whose adapter is merged); "
                "unset = the embedded SmolLM2"})
    head: str = field(default="generative", metadata={
        "help": "generative: label word after a chat prompt; classification: AutoModelForSequenceClassification",
        "choices": HEADS})
    dtype: str = field(default="float32", metadata={"help": "weights dtype", "choices": tuple(DTYPES)})
    attn_implementation: str = field(default="sdpa", metadata={"help": "base attention implementation"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow modeling code shipped with the model"})


@dataclass
class DataArguments(CheckedArguments):
    """Where NLI examples come from and how many of each subset (seeded; eval and test never overlap)."""

    config_relative_paths: ClassVar[tuple[str, ...]] = ("train_file", "eval_file", "test_file")

    dataset: str | None = field(default="nyu-mll/multi_nli", metadata={
        "help": "hub dataset with premise/hypothesis/label, or 'sample' (the bundled 48 examples); ignored when "
                "files are given"})
    train_file: str | None = field(default=None, metadata={
        "help": "local .jsonl/.json/.csv/.tsv; in a config file, relative to that file"})
    eval_file: str | None = field(default=None, metadata={"help": "default: the train file (subsets stay disjoint)"})
    test_file: str | None = field(default=None, metadata={"help": "default: the eval file"})
    train_split: str = field(default="train", metadata={"help": "hub split of the train subset"})
    eval_split: str = field(default="validation_matched", metadata={"help": "hub split of the eval subset"})
    test_split: str = field(default="validation_matched", metadata={
        "help": "hub split of the test subset (the eval split: disjoint subsets of it)"})
    train_size: int | None = field(default=500, metadata={"help": "examples; unset = all that is left, 0 = none"})
    eval_size: int | None = field(default=50, metadata={"help": "examples; unset = all that is left, 0 = none"})
    test_size: int | None = field(default=0, metadata={"help": "examples; unset = all that is left, 0 = none"})
    max_length: int = field(default=256, metadata={"help": "tokens per example (prompt cut on the left)"})


@dataclass
class FinetuneArguments(CheckedArguments):
    """LoRA (peft.LoraConfig keywords), masking and GQA conversion around `transformers.Trainer`."""

    lora: YamlMapping = field(default_factory=YamlMapping, metadata={
        "help": "peft.LoraConfig keyword arguments, e.g. '{r: 8, lora_alpha: 16, target_modules: [q_proj, v_proj]}', "
                f"over {DEFAULT_LORA}; keys given as flags or Python values replace those of the config file. task_type "
                "and the classification head's modules_to_save are set from --head"})
    use_lora: bool = field(default=True, metadata={"help": "false: full fine-tuning (small models only)"})
    max_new_tokens: int = field(default=8, metadata={"help": "generative head: answer length when predicting"})
    evaluate_before: bool = field(default=True, metadata={
        "help": "accuracy before fine-tuning (the zero-shot baseline) on the same subsets"})
    merge: bool = field(default=False, metadata={"help": "also save the LoRA-merged model under output_dir/merged"})
    masked_heads: list[str] | None = field(default=None, metadata={
        "help": "heads ('L-H') masked during training and evaluation"})
    mask_mode: str = field(default="zero", metadata={"help": "how masked heads are ablated", "choices": MASK_MODES})
    convert_kv_heads: str | None = field(default=None, metadata={
        "help": "convert to variable-group GQA first (saved under output_dir/converted): '29:1' (layer 29 -> 1 KV "
                "head), '15:16', '9' (every layer)"})
    convert_method: str = field(default="mean", metadata={
        "help": "how KV heads are merged (duplicate is used when heads are added)", "choices": CONVERT_METHODS})
    convert_calibration_tokens: int = field(default=512, metadata={"help": "tokens that calibrate the conversion"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.lora = {**DEFAULT_LORA, **self.lora}
        self.lora_config("generative")  # an unknown or invalid LoRA key fails here, before any work

    def lora_config(self, head: str) -> Any:
        """peft.LoraConfig for `head`: causal-LM task, or sequence classification with a trainable score head."""
        from peft import LoraConfig, TaskType

        classification = head == "classification"
        try:
            return LoraConfig(**{"task_type": TaskType.SEQ_CLS if classification else TaskType.CAUSAL_LM,
                                 "modules_to_save": ["score"] if classification else None, **self.lora})
        except TypeError as error:  # LoraConfig.__init__() got an unexpected keyword argument 'alpha'
            raise ValueError(f"lora: {error} (keys are peft.LoraConfig's: r, lora_alpha, lora_dropout, "
                             f"target_modules, ...)") from None


@dataclass
class MaskedEvalArguments(CheckedArguments):
    """Accuracy vs number of masked heads, heads ranked by a head-score file."""

    output_dir: str = field(metadata={"help": "run directory (masked_eval.json, .md, .png)"})
    head_scores: str = field(metadata={"help": "Retrieval_Head-format JSON (sidecar checked when present)"})
    seed: int = field(default=0, metadata={"help": "data subsets and random:K heads"})
    split: str = field(default="test", metadata={"help": "which subset to score", "choices": SPLITS})
    order: str = field(default="bottom", metadata={
        "help": "bottom: lowest scores first (seed 000's --maskbottom); top; random: seeded, never a top-K head",
        "choices": ORDERS})
    scope: str = field(default="global", metadata={
        "help": "global ranking, or per_layer: K heads in each of --layers", "choices": SCOPES})
    layers: list[int] | None = field(default=None, metadata={"help": "per_layer scope: layers to mask in (all)"})
    counts: list[int] = field(default_factory=lambda: [0, 5, 10, 20, 40], metadata={"help": "heads masked per point"})
    mask_mode: str = field(default="zero", metadata={"help": "how masked heads are ablated", "choices": MASK_MODES})
    batch_size: int = field(default=8, metadata={"help": "examples per forward pass"})
    max_new_tokens: int = field(default=8, metadata={"help": "generative head: answer length"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if any(count < 0 for count in self.counts):
            raise ValueError(f"counts must be >= 0, got {self.counts}")


FINETUNE_ARGUMENTS: tuple[type, ...] = (ModelArguments, DataArguments, FinetuneArguments, TrainingArguments)
MASKED_EVAL_ARGUMENTS: tuple[type, ...] = (ModelArguments, DataArguments, MaskedEvalArguments)

"""Load NLI models (base, converted, or a fine-tuning run's adapter) and predict labels from real outputs.

Generative head: greedy answer after the chat prompt, parsed with `nli.parse_label` (an answer naming no label
counts as wrong). Classification head: argmax of the score head. Under `accelerate launch` with several
processes the examples are sharded and the predictions gathered, so every process runs the same number of
forward passes (FSDP/ZeRO need that).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

from selective_attention.loading import assets
from selective_attention.loading.loader import resolve_dtype
from selective_attention.recipes.nli import (
    INVALID,
    LABELS,
    NLIExample,
    classification_features,
    generation_prompt,
    parse_label,
)

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class Prediction:
    id: str
    label: int
    prediction: int
    text: str = ""

    def as_row(self) -> dict:
        return {"id": self.id, "gold": LABELS[self.label],
                "predicted": LABELS[self.prediction] if self.prediction != INVALID else "invalid", "text": self.text}


def model_source(model: str | Path | None) -> str:
    return str(assets.model_dir()) if model is None else str(model)


def adapter_dir(source: str) -> Path | None:
    """The LoRA adapter directory when `source` is an adapter or a fine-tuning run directory."""
    path = Path(source)
    for candidate in (path, path / "adapter"):
        if (candidate / ADAPTER_CONFIG).exists():
            return candidate
    return None


def load_tokenizer(source: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_nli_model(model: str | Path | None, head: str, *, dtype: str = "float32", attn_implementation: str = "sdpa",
                   trust_remote_code: bool = False):
    """(model, tokenizer) for `head`; a LoRA adapter (or run dir) is loaded on its base and merged."""
    source = model_source(model)
    adapter = adapter_dir(source)
    base = source
    if adapter is not None:
        base = json.loads((adapter / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
        tokenizer_source = str(adapter) if (adapter / "tokenizer_config.json").exists() else base
    else:
        tokenizer_source = source
    tokenizer = load_tokenizer(tokenizer_source, trust_remote_code)
    kwargs = dict(dtype=resolve_dtype(dtype), attn_implementation=attn_implementation,
                  trust_remote_code=trust_remote_code)
    if head == "classification":
        loaded = AutoModelForSequenceClassification.from_pretrained(
            base, num_labels=len(LABELS), id2label=dict(enumerate(LABELS)),
            label2id={name: i for i, name in enumerate(LABELS)}, **kwargs)
        loaded.config.pad_token_id = tokenizer.pad_token_id
    else:
        loaded = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    if adapter is not None:
        from peft import PeftModel

        loaded = PeftModel.from_pretrained(loaded, str(adapter)).merge_and_unload()
        logger.info("merged LoRA adapter %s into %s", adapter, base)
    return loaded.eval(), tokenizer


def _sharded(examples: list[NLIExample], predict_fn) -> list[Prediction]:
    """Run `predict_fn` on this process's share and gather everyone's predictions, in order."""
    from accelerate import PartialState
    from accelerate.utils import gather_object

    state = PartialState()
    if state.num_processes == 1:
        return predict_fn(examples)
    indexed = list(enumerate(examples))
    with state.split_between_processes(indexed, apply_padding=True) as mine:
        local = predict_fn([example for _, example in mine])
        local_rows = [(index, p) for (index, _), p in zip(mine, local)]
    gathered = gather_object(local_rows)
    by_index = {}
    for index, prediction in gathered:
        by_index.setdefault(index, prediction)
    return [by_index[i] for i in range(len(examples))]


@torch.no_grad()  # not inference_mode: HeadMask caches index tensors that training reuses
def _generate(model, tokenizer, examples: list[NLIExample], batch_size: int, max_new_tokens: int) -> list[Prediction]:
    out: list[Prediction] = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    try:
        for start in tqdm(range(0, len(examples), batch_size), desc="predict", disable=len(examples) <= batch_size):
            batch = examples[start:start + batch_size]
            prompts = [generation_prompt(tokenizer, example) for example in batch]
            inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                       pad_token_id=tokenizer.pad_token_id)
            for example, row in zip(batch, generated[:, inputs.input_ids.shape[1]:]):
                text = tokenizer.decode(row, skip_special_tokens=True).strip()
                out.append(Prediction(example.id, example.label, parse_label(text), text))
    finally:
        tokenizer.padding_side = side
    return out


@torch.no_grad()  # not inference_mode: HeadMask caches index tensors that training reuses
def _classify(model, tokenizer, examples: list[NLIExample], batch_size: int, max_length: int) -> list[Prediction]:
    out: list[Prediction] = []
    device = next(model.parameters()).device
    for start in range(0, len(examples), batch_size):
        batch = examples[start:start + batch_size]
        features = [classification_features(tokenizer, example, max_length) for example in batch]
        inputs = tokenizer.pad([{k: f[k] for k in ("input_ids", "attention_mask")} for f in features],
                               return_tensors="pt").to(device)
        logits = model(**inputs).logits
        for example, row in zip(batch, logits.argmax(-1).tolist()):
            out.append(Prediction(example.id, example.label, int(row), LABELS[int(row)]))
    return out


def predict(model, tokenizer, examples: list[NLIExample], head: str, *, batch_size: int = 8,
            max_new_tokens: int = 8, max_length: int = 256) -> list[Prediction]:
    """Predictions for `examples` (sharded across processes when launched with several)."""
    was_training = model.training
    model.eval()
    try:
        if head == "classification":
            return _sharded(examples, lambda part: _classify(model, tokenizer, part, batch_size, max_length))
        return _sharded(examples, lambda part: _generate(model, tokenizer, part, batch_size, max_new_tokens))
    finally:
        model.train(was_training)

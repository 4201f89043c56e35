"""Model cards and uploads to the Hugging Face Hub for selective-attention checkpoints.

The card (huggingface_hub `ModelCard`) says what the checkpoint is: base model, variant (KV heads per layer,
masked heads and mode, conversion method and per-layer error), evaluation results found beside it
(`metrics.json` of a fine-tuning run, `masked_eval.json`), and how to load it. Config fields are read with
`getattr`-style lookups, so plain Llama checkpoints and PEFT adapters get a card too.
"""

from __future__ import annotations

import fnmatch
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from selective_attention.cache.checkpoint import kept_fraction

logger = logging.getLogger(__name__)

#: Files pushed from a checkpoint directory (top level only): config, weights, custom code, tokenizer, results.
UPLOAD_PATTERNS = (
    "config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json", "*.py",
    "adapter_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "chat_template.jinja", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
    "metrics.json", "masked_eval.json", "masked_eval.md", "masked_eval.png", "conversion_report.json",
    "head_scores.json", "head_scores.meta.json", "README.md",
)
CARD_NAME = "README.md"


@dataclass
class PushPlan:
    repo_id: str
    directory: Path
    files: list[str] = field(default_factory=list)  #: paths relative to `directory`, as they land in the repo
    card_path: Path | None = None
    private: bool = False
    url: str | None = None  #: commit URL after a real push; None for a dry run


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None


def _text_config(config: dict) -> dict:
    return config.get("text_config") or config


def _runs(counts: list[int]) -> str:
    """[3, 3, 3, 1] -> 'layers 0-2: 3, layer 3: 1'."""
    parts, start = [], 0
    for index in range(1, len(counts) + 1):
        if index == len(counts) or counts[index] != counts[start]:
            span = f"layer {start}" if index - 1 == start else f"layers {start}-{index - 1}"
            parts.append(f"{span}: {counts[start]}")
            start = index
    return ", ".join(parts)


def _results_beside(directory: Path) -> tuple[dict | None, dict | None]:
    """metrics.json / masked_eval.json in the directory, or in its parent run directory (adapter/, merged/)."""
    for place in (directory, directory.parent):
        metrics, masked = _read_json(place / "metrics.json"), _read_json(place / "masked_eval.json")
        if metrics or masked:
            return metrics, masked
    return None, None


def describe_variant(config: dict) -> list[str]:
    """Card lines about the variant; empty fields are left out (a plain Llama is 'unchanged')."""
    text = _text_config(config)
    lines = [f"- architecture: `{text.get('model_type', 'unknown')}`, {text.get('num_hidden_layers', '?')} layers, "
             f"{text.get('num_attention_heads', '?')} query heads"]
    per_layer = text.get("num_key_value_heads_per_layer")
    if per_layer:
        lines.append(f"- KV heads per layer: {_runs(list(per_layer))}")
    elif text.get("num_key_value_heads") is not None:
        lines.append(f"- KV heads: {text['num_key_value_heads']} in every layer (unchanged GQA)")
    masked = text.get("sa_masked_heads")
    if masked:
        lines.append(f"- masked heads ({len(masked)}, mode `{text.get('sa_mask_mode') or 'zero'}`): "
                     f"{', '.join(masked)}")
    conversion = text.get("conversion")
    if conversion:
        lines.append(f"- conversion: `{conversion.get('method', '?')}` from `{conversion.get('source', '?')}`")
        errors = conversion.get("layer_errors") or []
        changed = [(layer, error) for layer, error in enumerate(errors) if error]
        if changed:
            lines.append("- per-layer K/V reconstruction error (changed layers): "
                         + ", ".join(f"layer {layer}: {error:.4f}" for layer, error in changed))
        elif errors:
            lines.append("- reconstruction error: 0 in every layer (exact conversion)")
    headwise = text.get("sa_headwise")
    if headwise:
        heads = [v for row in headwise["pattern"] for v in row]
        length = text.get("max_position_embeddings") or 8192
        lines.append(f"- head-wise KV cache: {sum(heads)}/{len(heads)} KV heads keep every position, the others the "
                     f"first {headwise['sink']} + last {headwise['window']}; the cache keeps "
                     f"{100 * kept_fraction(headwise, length):.1f}% of the KV positions at {length} tokens "
                     "(`generate` builds it, no plugin needed)")
    return lines


def _evaluation(metrics: dict | None, masked: dict | None) -> tuple[list[str], list[EvalResult]]:
    lines: list[str] = []
    results: list[EvalResult] = []
    if metrics:
        data = metrics.get("data", {})
        lines += ["| stage | split | examples | accuracy | macro F1 |", "|---|---|---:|---:|---:|"]
        for stage in ("before", "after"):
            for split, values in (metrics.get(stage) or {}).items():
                lines.append(f"| {stage} fine-tuning | {split} | {values.get('count', data.get(split, '?'))} | "
                             f"{values['accuracy']:.3f} | {values.get('macro_f1', float('nan')):.3f} |")
                if stage == "after":
                    source = metrics.get("data_source") or "nyu-mll/multi_nli"
                    results.append(EvalResult(task_type="text-classification", dataset_type=source,
                                              dataset_name=f"{source} ({split} subset)", dataset_split=split,
                                              metric_type="accuracy", metric_value=round(values["accuracy"], 4)))
        train = metrics.get("train") or {}
        if train.get("loss_history"):
            history = train["loss_history"]
            lines.append(f"\nTraining loss {history[0]['loss']:.3f} -> {history[-1]['loss']:.3f} over "
                         f"{train.get('steps', '?')} steps ({metrics.get('head', 'generative')} head).")
    if masked:
        lines += ["", f"Accuracy vs masked heads ({masked.get('order')} by head score, {masked.get('scope')}, mode "
                      f"`{masked.get('mode')}`):", "", "| masked heads | accuracy |", "|---:|---:|"]
        lines += [f"| {row['masked']} | {row['accuracy']:.3f} |" for row in masked.get("rows", [])]
    return lines, results


def build_model_card(directory: str | Path, repo_id: str | None = None, base_model: str | None = None) -> ModelCard:
    """A ModelCard for the checkpoint (or PEFT adapter) in `directory`."""
    directory = Path(directory)
    config = _read_json(directory / "config.json") or {}
    adapter = _read_json(directory / "adapter_config.json")
    if not config and not adapter:
        raise ValueError(f"{directory} holds neither config.json nor adapter_config.json: not a checkpoint")
    conversion = _text_config(config).get("conversion") or {}
    base = (base_model or (adapter or {}).get("base_model_name_or_path") or conversion.get("source")
            or config.get("_name_or_path") or None)
    metrics, masked = _results_beside(directory)
    custom_code = bool(config.get("auto_map")) and any(directory.glob("*.py"))
    eval_lines, eval_results = _evaluation(metrics, masked)
    name = repo_id.split("/")[-1] if repo_id else directory.name
    tags = ["selective-attention", "head-masking"]
    if _text_config(config).get("num_key_value_heads_per_layer"):
        tags.append("variable-gqa")
    if adapter:
        tags += ["peft", "lora"]
    data = ModelCardData(
        base_model=base if base and not Path(str(base)).is_absolute() else None,
        library_name="peft" if adapter else "transformers", tags=tags,
        datasets=[metrics["data_source"]] if metrics and "/" in str(metrics.get("data_source")) else None, pipeline_tag="text-generation",
        model_name=name if eval_results else None, eval_results=eval_results or None,
    )
    repo = repo_id or str(directory)
    if adapter:
        load = ["```python", "from peft import AutoPeftModelForCausalLM",
                f'model = AutoPeftModelForCausalLM.from_pretrained("{repo}")', "```"]
    else:
        remote = ", trust_remote_code=True" if custom_code else ""
        load = ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                f'model = AutoModelForCausalLM.from_pretrained("{repo}"{remote})',
                f'tokenizer = AutoTokenizer.from_pretrained("{repo}")', "```"]
        if custom_code:
            load.append("\n`trust_remote_code=True` runs the modeling code shipped in this repository (torch + "
                        "transformers only). With `pip install selective-attention` installed, `import "
                        "selective_attention` registers the architecture and the flag is not needed.")
        if _text_config(config).get("sa_masked_heads"):
            load.append("\nThe masked heads recorded in the config are applied when the model loads.")
    variant = (describe_variant(config) if config else
               [f"- LoRA adapter (r={adapter.get('r')}, alpha={adapter.get('lora_alpha')}) on "
                f"`{', '.join(sorted(adapter.get('target_modules') or []))}`"])
    body = [
        f"# {name}", "",
        f"A checkpoint made with [selective-attention](https://pypi.org/project/selective-attention/)"
        f"{f' from `{base}`' if base else ''}.", "",
        "## Variant", "", *variant, "",
        "## Evaluation", "", *(eval_lines or ["No evaluation results were found beside this checkpoint."]), "",
        "## How to load", "", *load, "",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))


def upload_files(directory: Path) -> list[str]:
    """The files of `directory` that a push uploads (sorted, top level, by `UPLOAD_PATTERNS`)."""
    files = [path.name for path in sorted(directory.iterdir()) if path.is_file()
             and not path.name.startswith(".") and any(fnmatch.fnmatch(path.name, p) for p in UPLOAD_PATTERNS)]
    return files


def push_to_hub(directory: str | Path, repo_id: str, *, private: bool = False, dry_run: bool = False,
                api: HfApi | None = None, token: str | None = None, commit_message: str | None = None) -> PushPlan:
    """Write the model card into `directory`, then upload config, weights, custom code and card in one commit.

    `dry_run` writes the card and returns the plan without touching the network.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"invalid repo id {repo_id!r}: {error}") from None
    if "/" not in repo_id:
        raise ValueError(f"repo id {repo_id!r} must be ORG/NAME (or USER/NAME)")
    if not any(directory.glob("*.safetensors")):
        raise ValueError(f"{directory} has no .safetensors weights to upload")
    card = build_model_card(directory, repo_id)
    card_path = directory / CARD_NAME
    card.save(card_path)
    plan = PushPlan(repo_id, directory, upload_files(directory), card_path, private)
    if dry_run:
        logger.info("dry run: would upload %d files to %s", len(plan.files), repo_id)
        return plan
    api = api or HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(directory / name)) for name in plan.files]
    info = api.create_commit(repo_id, operations, commit_message=commit_message or "Upload with selective-attention")
    plan.url = getattr(info, "commit_url", None) or str(info)
    logger.info("pushed %d files to %s", len(plan.files), repo_id)
    return plan

"""MNLI fine-tuning with `transformers.Trainer` + `peft` LoRA (seed 000's experiment, as a reusable recipe).

Two heads: `generative` (causal LM; chat prompt with premise, hypothesis and the three options; the loss is
only on the answer tokens) and `classification` (`AutoModelForSequenceClassification`; LoRA plus a trainable
score head via `modules_to_save`). Accuracy before and after fine-tuning is measured from real predictions on
seeded, disjoint eval/test subsets. Outputs: `adapter/`, optional `merged/`, `metrics.json`, predictions.
Training itself (schedule, precision, logging to `report_to` trackers) is whatever `TrainingArguments` says.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from transformers import TrainingArguments

from selective_attention.gqa.convert import convert_model
from selective_attention.heads.masking import mask_heads
from selective_attention.recipes import nli, nli_data
from selective_attention.recipes.arguments import DataArguments, FinetuneArguments, ModelArguments
from selective_attention.recipes.io import RUN_MARKER, prepare_output_dir, write_json, write_jsonl
from selective_attention.recipes.parsing import settings
from selective_attention.recipes.predict import load_nli_model, model_source, predict

logger = logging.getLogger(__name__)


def _features(tokenizer, examples: list[nli.NLIExample], head: str, max_length: int):
    from datasets import Dataset

    build = nli.classification_features if head == "classification" else nli.generative_features
    return Dataset.from_list([build(tokenizer, example, max_length) for example in examples])


def _score(model, tokenizer, splits: dict, stage: str, output_dir: Path, main_process: bool, *, head: str,
           batch_size: int, max_new_tokens: int, max_length: int) -> dict:
    """Accuracy etc. on the eval and test subsets; predictions written next to metrics.json."""
    results = {}
    for name in ("eval", "test"):
        examples = splits.get(name) or []
        if not examples:
            continue
        start = time.perf_counter()
        predictions = predict(model, tokenizer, examples, head, batch_size=batch_size,
                              max_new_tokens=max_new_tokens, max_length=max_length)
        metrics = nli.classification_metrics([p.label for p in predictions], [p.prediction for p in predictions])
        metrics["seconds"] = round(time.perf_counter() - start, 2)
        results[name] = metrics
        if main_process:
            write_jsonl(output_dir / f"predictions_{stage}_{name}.jsonl", [p.as_row() for p in predictions])
        logger.info("%s %s accuracy %.3f (%d examples, %d invalid)", stage, name, metrics["accuracy"],
                    metrics["count"], metrics["invalid"])
    return results


def _source(data: DataArguments) -> str:
    if data.train_file or data.eval_file or data.test_file:
        return ", ".join(sorted({Path(f).name for f in (data.train_file, data.eval_file, data.test_file) if f}))
    return nli_data.sample_file().name if data.dataset == nli_data.SAMPLE_NAME else str(data.dataset)


def _convert(model: ModelArguments, recipe: FinetuneArguments, output_dir: Path, state) -> Path:
    """Variable-group GQA conversion by `selective_attention.gqa.convert` (main process writes, others wait)."""
    target = (output_dir / "converted").resolve()  # absolute: the adapter records it as its base model
    if state.is_main_process:
        _, report = convert_model(model_source(model.model), recipe.convert_kv_heads, recipe.convert_method,
                                  calibration_tokens=recipe.convert_calibration_tokens, out_dir=target)
        logger.info("converted %s -> %s:\n%s", model_source(model.model), target, report.table())
    state.wait_for_everyone()
    return target


def run_finetune(model_args: ModelArguments, data: DataArguments, recipe: FinetuneArguments,
                 training: TrainingArguments, *, overwrite: bool = False) -> dict:
    """Fine-tune as the arguments say; returns the metrics also written to `output_dir/metrics.json`."""
    import torch
    from accelerate import PartialState
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding, Trainer, set_seed

    state = PartialState()
    main = state.is_main_process
    output_dir = Path(training.output_dir)
    head = model_args.head
    if main:
        prepare_output_dir(output_dir, overwrite)
        write_json(output_dir / RUN_MARKER, settings(model_args, data, recipe, training))
    state.wait_for_everyone()
    set_seed(training.seed)

    splits = nli_data.load_run_splits(data, training.seed)
    if not splits["train"]:
        raise ValueError("train_size is 0: nothing to fine-tune on")
    if training.eval_strategy != "no" and not splits["eval"]:
        raise ValueError(f"eval_strategy {training.eval_strategy.value!r} needs eval examples: set eval_size > 0 "
                         "or eval_strategy: 'no'")
    if main:
        write_json(output_dir / "data_manifest.json",
                   {name: [example.id for example in examples] for name, examples in splits.items()})

    started = time.perf_counter()
    model_path = model_args.model
    if recipe.convert_kv_heads is not None:
        model_path = str(_convert(model_args, recipe, output_dir, state))
    model, tokenizer = load_nli_model(model_path, head, dtype=model_args.dtype,
                                      attn_implementation=model_args.attn_implementation,
                                      trust_remote_code=model_args.trust_remote_code)
    if state.device.type != "cpu":
        model.to(state.device)
    if recipe.masked_heads:
        mask_heads(model, recipe.masked_heads, recipe.mask_mode)

    scoring = dict(head=head, batch_size=training.per_device_eval_batch_size, max_new_tokens=recipe.max_new_tokens,
                   max_length=data.max_length)
    metrics: dict = {"model": model_source(model_args.model), "head": head, "data_source": _source(data),
                     "converted": model_path if recipe.convert_kv_heads is not None else None,
                     "data": {name: len(examples) for name, examples in splits.items()},
                     "masked_heads": recipe.masked_heads, "mask_mode": recipe.mask_mode if recipe.masked_heads else None}
    if recipe.evaluate_before:
        metrics["before"] = _score(model, tokenizer, splits, "before", output_dir, main, **scoring)

    if recipe.use_lora:
        from peft import get_peft_model

        model = get_peft_model(model, recipe.lora_config(head))
        trainable, total = model.get_nb_trainable_parameters()
    else:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
    metrics["parameters"] = {"trainable": trainable, "total": total}
    logger.info("trainable parameters: %d of %d (%.2f%%)", trainable, total, 100 * trainable / total)

    train_data = _features(tokenizer, splits["train"], head, data.max_length)
    eval_data = _features(tokenizer, splits["eval"], head, data.max_length) if splits["eval"] else None
    collator = (DataCollatorWithPadding(tokenizer) if head == "classification"
                else DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
    trainer = Trainer(model=model, args=training, train_dataset=train_data, eval_dataset=eval_data,
                      data_collator=collator, processing_class=tokenizer)
    result = trainer.train()
    history = trainer.state.log_history
    losses = [{"step": row["step"], "epoch": row.get("epoch"), "loss": row["loss"]} for row in history if "loss" in row]
    eval_losses = [{"step": row["step"], "epoch": row.get("epoch"), "eval_loss": row["eval_loss"]}
                   for row in history if "eval_loss" in row]
    metrics["train"] = {"train_loss": result.training_loss, "steps": result.global_step,
                        "seconds": round(result.metrics.get("train_runtime", 0.0), 2),
                        "loss_history": losses, "eval_loss_history": eval_losses}

    trainer.save_model(str(output_dir / "adapter"))
    if main:
        tokenizer.save_pretrained(output_dir / "adapter")
    metrics["after"] = _score(trainer.model, tokenizer, splits, "after", output_dir, main, **scoring)

    if recipe.merge and main:
        merged = trainer.model.merge_and_unload() if recipe.use_lora else trainer.model
        merged.save_pretrained(output_dir / "merged")
        tokenizer.save_pretrained(output_dir / "merged")
    metrics["seconds"] = round(time.perf_counter() - started, 2)
    metrics["device"] = str(state.device)
    metrics["num_processes"] = state.num_processes
    metrics["torch"] = torch.__version__
    if main:
        write_json(output_dir / "metrics.json", metrics)
    state.wait_for_everyone()
    return metrics

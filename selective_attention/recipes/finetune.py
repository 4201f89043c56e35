"""MNLI fine-tuning with `transformers.Trainer` + `peft` LoRA (seed 000's experiment, as a reusable recipe).

Two heads: `generative` (causal LM; chat prompt with premise, hypothesis and the three options; the loss is
only on the answer tokens) and `classification` (`AutoModelForSequenceClassification`; LoRA plus a trainable
score head via `modules_to_save`). Accuracy before and after fine-tuning is measured from real predictions on
seeded, disjoint eval/test subsets. Outputs: `adapter/`, optional `merged/`, `metrics.json`, predictions.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from .. import nli
from ..masking import mask_heads
from .config import FinetuneConfig, to_dict
from .io import RUN_MARKER, prepare_output_dir, write_json, write_jsonl
from .predict import load_nli_model, model_source, predict

logger = logging.getLogger(__name__)


def _features(tokenizer, examples: list[nli.NLIExample], head: str, max_length: int):
    from datasets import Dataset

    build = nli.classification_features if head == "classification" else nli.generative_features
    return Dataset.from_list([build(tokenizer, example, max_length) for example in examples])


def _lora(config: FinetuneConfig):
    from peft import LoraConfig, TaskType

    section = config.lora
    classification = config.head == "classification"
    return LoraConfig(
        r=section.r, lora_alpha=section.alpha, lora_dropout=section.dropout,
        target_modules=list(section.target_modules),
        task_type=TaskType.SEQ_CLS if classification else TaskType.CAUSAL_LM,
        modules_to_save=["score"] if classification else None,
    )


def _score(model, tokenizer, splits: dict, config: FinetuneConfig, stage: str, output_dir: Path,
           main_process: bool) -> dict:
    """Accuracy etc. on the eval and test subsets; predictions written next to metrics.json."""
    results = {}
    for name in ("eval", "test"):
        examples = splits.get(name) or []
        if not examples:
            continue
        start = time.perf_counter()
        predictions = predict(model, tokenizer, examples, config.head, batch_size=config.training.eval_batch_size,
                              max_new_tokens=config.max_new_tokens, max_length=config.data.max_length)
        metrics = nli.classification_metrics([p.label for p in predictions], [p.prediction for p in predictions])
        metrics["seconds"] = round(time.perf_counter() - start, 2)
        results[name] = metrics
        if main_process:
            write_jsonl(output_dir / f"predictions_{stage}_{name}.jsonl", [p.as_row() for p in predictions])
        logger.info("%s %s accuracy %.3f (%d examples, %d invalid)", stage, name, metrics["accuracy"],
                    metrics["count"], metrics["invalid"])
    return results


def _source(config: FinetuneConfig) -> str:
    data = config.data
    if data.train_file or data.eval_file or data.test_file:
        return ", ".join(sorted({Path(f).name for f in (data.train_file, data.eval_file, data.test_file) if f}))
    return nli.sample_file().name if data.dataset == nli.SAMPLE_NAME else str(data.dataset)


def _convert(config: FinetuneConfig, output_dir: Path, state) -> Path:
    """Variable-group GQA conversion by `selective_attention.models.convert` (main process writes, others wait)."""
    from ..models.convert import convert_model

    target = (output_dir / "converted").resolve()  # absolute: the adapter records it as its base model
    if state.is_main_process:
        _, report = convert_model(model_source(config.model), config.convert.kv_heads, config.convert.method,
                                  calibration_tokens=config.convert.calibration_tokens, out_dir=target)
        logger.info("converted %s -> %s:\n%s", model_source(config.model), target, report.table())
    state.wait_for_everyone()
    return target


def run_finetune(config: FinetuneConfig, *, overwrite: bool = False) -> dict:
    """Fine-tune as `config` says; returns the metrics also written to `output_dir/metrics.json`."""
    import torch
    from accelerate import PartialState
    from transformers import (DataCollatorForSeq2Seq, DataCollatorWithPadding, Trainer, TrainingArguments,
                              set_seed)

    state = PartialState()
    main = state.is_main_process
    output_dir = Path(config.output_dir)
    if main:
        prepare_output_dir(output_dir, overwrite)
        write_json(output_dir / RUN_MARKER, to_dict(config))
    state.wait_for_everyone()
    set_seed(config.seed)

    splits = nli.load_run_splits(config.data, config.seed)
    if not splits["train"]:
        raise ValueError("data.train_size is 0: nothing to fine-tune on")
    if main:
        write_json(output_dir / "data_manifest.json",
                   {name: [example.id for example in examples] for name, examples in splits.items()})

    started = time.perf_counter()
    model_path = config.model
    if config.convert is not None:
        model_path = str(_convert(config, output_dir, state))
    model, tokenizer = load_nli_model(model_path, config.head, dtype=config.dtype,
                                      attn_implementation=config.attn_implementation,
                                      trust_remote_code=config.trust_remote_code)
    if state.device.type != "cpu":
        model.to(state.device)
    if config.masked_heads:
        mask_heads(model, config.masked_heads, config.mask_mode)

    metrics: dict = {"model": model_source(config.model), "head": config.head, "data_source": _source(config),
                     "converted": model_path if config.convert is not None else None,
                     "data": {name: len(examples) for name, examples in splits.items()},
                     "masked_heads": config.masked_heads, "mask_mode": config.mask_mode if config.masked_heads else None}
    if config.evaluate_before:
        metrics["before"] = _score(model, tokenizer, splits, config, "before", output_dir, main)

    if config.lora.enabled:
        from peft import get_peft_model

        model = get_peft_model(model, _lora(config))
        trainable, total = model.get_nb_trainable_parameters()
    else:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
    metrics["parameters"] = {"trainable": trainable, "total": total}
    logger.info("trainable parameters: %d of %d (%.2f%%)", trainable, total, 100 * trainable / total)

    train_data = _features(tokenizer, splits["train"], config.head, config.data.max_length)
    eval_data = _features(tokenizer, splits["eval"], config.head, config.data.max_length) if splits["eval"] else None
    collator = (DataCollatorWithPadding(tokenizer) if config.head == "classification"
                else DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
    section = config.training
    arguments = TrainingArguments(
        output_dir=str(output_dir / "checkpoints"),
        num_train_epochs=section.epochs, max_steps=section.max_steps, learning_rate=section.learning_rate,
        per_device_train_batch_size=section.batch_size, per_device_eval_batch_size=section.eval_batch_size,
        gradient_accumulation_steps=section.gradient_accumulation_steps, weight_decay=section.weight_decay,
        warmup_steps=section.warmup_steps, lr_scheduler_type=section.lr_scheduler_type,
        logging_steps=section.logging_steps, logging_first_step=True,
        gradient_checkpointing=section.gradient_checkpointing, bf16=section.bf16, fp16=section.fp16,
        eval_strategy="epoch" if (section.eval_each_epoch and eval_data is not None) else "no",
        save_strategy="no", report_to=section.report_to, seed=config.seed, data_seed=config.seed,
        remove_unused_columns=False, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=arguments, train_dataset=train_data, eval_dataset=eval_data,
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
    metrics["after"] = _score(trainer.model, tokenizer, splits, config, "after", output_dir, main)

    if config.merge and main:
        merged = trainer.model.merge_and_unload() if config.lora.enabled else trainer.model
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

"""MNLI fine-tuning recipe: transformers.Trainer + peft LoRA, driven by a flat YAML config.

    accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/mnli_finetune.py \
        --config recipes/configs/smoke_cpu.yaml --output_dir runs/smoke --overwrite

Every key of the config is also a flag (`--num_train_epochs 1`, `--lora '{r: 4}'`, `--model DIR`), which
overrides the file: the fields of ModelArguments, DataArguments, FinetuneArguments and TrainingArguments.
"""

from __future__ import annotations

import json
import logging
import sys

from selective_attention.recipes import FINETUNE_ARGUMENTS, command_line, run_finetune


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        (model, data, recipe, training), options = command_line(FINETUNE_ARGUMENTS, argv, __doc__)
        metrics = run_finetune(model, data, recipe, training, overwrite=options.overwrite)
    except (ValueError, FileNotFoundError) as error:
        logging.getLogger("recipes").error("%s", error)
        return 2
    summary = {stage: {split: round(m["accuracy"], 4) for split, m in metrics.get(stage, {}).items()}
               for stage in ("before", "after")}
    print(json.dumps({"output_dir": training.output_dir, "accuracy": summary,
                      "train_loss_first_last": [metrics["train"]["loss_history"][0]["loss"],
                                                metrics["train"]["loss_history"][-1]["loss"]]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

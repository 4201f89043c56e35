"""Recipes: MNLI fine-tuning (Trainer + peft LoRA), accuracy vs masked heads, and the needle pipeline.

Each recipe's arguments are dataclasses parsed by `transformers.HfArgumentParser` from a flat YAML file, Python
values or command-line flags (`parse_config`, `command_line`); `TrainingArguments` and peft's `LoraConfig` are
used as they are. The scripts under `recipes/` only parse, call `run_*` and print.
"""

from selective_attention.recipes.arguments import (
                        FINETUNE_ARGUMENTS,
                        MASKED_EVAL_ARGUMENTS,
                        DataArguments,
                        FinetuneArguments,
                        MaskedEvalArguments,
                        ModelArguments,
)
from selective_attention.recipes.finetune import run_finetune
from selective_attention.recipes.masked_eval import run_masked_eval
from selective_attention.recipes.needle_pipeline import NEEDLE_ARGUMENTS, NeedleRecipeArguments, run_needle_recipe
from selective_attention.recipes.parsing import command_line, parse_config

__all__ = [
    "DataArguments", "FINETUNE_ARGUMENTS", "FinetuneArguments", "MASKED_EVAL_ARGUMENTS", "MaskedEvalArguments",
    "ModelArguments", "NEEDLE_ARGUMENTS", "NeedleRecipeArguments", "command_line", "parse_config", "run_finetune",
    "run_masked_eval", "run_needle_recipe",
]

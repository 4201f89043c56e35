"""MNLI fine-tuning recipe: Trainer + PEFT LoRA, driven by a YAML config.

    accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/mnli_finetune.py \
        --config recipes/configs/smoke_cpu.yaml --output-dir runs/smoke --overwrite
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from selective_attention.finetune import FinetuneConfig, load_config
from selective_attention.finetune.train import run_finetune


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file with FinetuneConfig keys")
    parser.add_argument("--output-dir", default=None, help="overrides output_dir of the config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set training.epochs=1 (repeatable)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = list(args.set) + ([f"output_dir={args.output_dir}"] if args.output_dir else [])
    try:
        config = load_config(FinetuneConfig, args.config, overrides)
        metrics = run_finetune(config, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError) as error:
        logging.getLogger("recipes").error("%s", error)
        return 2
    summary = {stage: {split: round(m["accuracy"], 4) for split, m in metrics.get(stage, {}).items()}
               for stage in ("before", "after")}
    print(json.dumps({"output_dir": config.output_dir, "accuracy": summary,
                      "train_loss_first_last": [metrics["train"]["loss_history"][0]["loss"],
                                                metrics["train"]["loss_history"][-1]["loss"]]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Retrieval experiments from one YAML: detect retrieval heads -> needle grid with each mask -> plots.

    python recipes/needle_pipeline.py --config recipes/configs/needle_cpu.yaml
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from selective_attention.finetune import load_config
from selective_attention.finetune.needle_recipe import NeedleRecipeConfig, run_needle_recipe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file with NeedleRecipeConfig keys")
    parser.add_argument("--output-dir", default=None, help="overrides output_dir of the config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set needle.lengths=[500] (repeatable)")
    parser.add_argument("--overwrite", action="store_true", help="replace a run directory made with another config")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = list(args.set) + ([f"output_dir={args.output_dir}"] if args.output_dir else [])
    try:
        config = load_config(NeedleRecipeConfig, args.config, overrides)
        summary = run_needle_recipe(config, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError) as error:
        logging.getLogger("recipes").error("%s", error)
        return 2
    print(json.dumps({"output_dir": config.output_dir,
                      "mean_score": {row["mask"] or "none": row["mean_score"] for row in summary["runs"]}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""MNLI accuracy vs number of masked heads (bottom-k / top-k / random by a head-score file).

    python recipes/mnli_masked_eval.py --config recipes/configs/masked_eval_cpu.yaml --overwrite
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from selective_attention.finetune import MaskedEvalConfig, load_config
from selective_attention.finetune.masked_eval import run_masked_eval


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file with MaskedEvalConfig keys")
    parser.add_argument("--output-dir", default=None, help="overrides output_dir of the config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set counts=[0,5,10] (repeatable)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = list(args.set) + ([f"output_dir={args.output_dir}"] if args.output_dir else [])
    try:
        config = load_config(MaskedEvalConfig, args.config, overrides)
        result = run_masked_eval(config, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError) as error:
        logging.getLogger("recipes").error("%s", error)
        return 2
    print(json.dumps({"output_dir": config.output_dir, "mode": result["mode"],
                      "accuracy_by_masked": {row["masked"]: round(row["accuracy"], 4) for row in result["rows"]}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

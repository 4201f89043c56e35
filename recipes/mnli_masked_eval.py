"""MNLI accuracy vs number of masked heads (bottom-k / top-k / random by a head-score file).

    python recipes/mnli_masked_eval.py --config recipes/configs/masked_eval_cpu.yaml --overwrite

Every key of the config is also a flag that overrides the file (`--counts 0 5 10`, `--mask_mode uniform`):
the fields of ModelArguments, DataArguments and MaskedEvalArguments.
"""

from __future__ import annotations

import json
import logging
import sys

from selective_attention.recipes import MASKED_EVAL_ARGUMENTS, command_line, run_masked_eval


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        (model, data, sweep), options = command_line(MASKED_EVAL_ARGUMENTS, argv, __doc__)
        result = run_masked_eval(model, data, sweep, overwrite=options.overwrite)
    except (ValueError, FileNotFoundError) as error:
        logging.getLogger("recipes").error("%s", error)
        return 2
    print(json.dumps({"output_dir": sweep.output_dir, "mode": result["mode"],
                      "accuracy_by_masked": {row["masked"]: round(row["accuracy"], 4) for row in result["rows"]}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

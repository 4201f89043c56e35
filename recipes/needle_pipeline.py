"""Retrieval experiments from one YAML: detect retrieval heads -> needle grid with each mask -> plots.

    python recipes/needle_pipeline.py --config recipes/configs/needle_cpu.yaml

Every key of the config is also a flag that overrides the file (`--lengths 500`, `--language zh`, `--no-chat`,
`--score_against answer`): the fields of NeedleRecipeArguments, named as the `needle` command's flags.
"""

from __future__ import annotations

import json
import logging
import sys

from selective_attention.recipes import NEEDLE_ARGUMENTS, command_line, run_needle_recipe


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        (config,), options = command_line(NEEDLE_ARGUMENTS, argv, __doc__)
        summary = run_needle_recipe(config, overwrite=options.overwrite)
    except (ValueError, FileNotFoundError) as error:
        logging.getLogger("recipes").error("%s", error)
        return 2
    print(json.dumps({"output_dir": config.output_dir,
                      "mean_score": {row["mask"] or "none": row["mean_score"] for row in summary["runs"]}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

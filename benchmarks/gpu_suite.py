"""One prepared GPU run: every accelerated path of selective-attention checked and timed, in one command.

    python benchmarks/gpu_suite.py --output gpu_results                 # one GPU; sized for < 8 min on an H100
    python benchmarks/gpu_suite.py --output gpu_results --model DIR      # also the real model in DIR (e.g. SmolLM2)
    python benchmarks/gpu_suite.py --tiny --output /tmp/gpu_suite       # every section at toy sizes, CPU, seconds

Needs torch and transformers only (no download: models are random weights at real shapes, Llama-3.1-8B in bf16
and a small one). Six sections (benchmarks/gpu_sections/), each guarded: one that fails or runs out of memory is
reported and the others still run. Writes gpu_suite.json and gpu_suite.md to --output after every section, and
exits 1 when a check failed or a section raised.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers

import selective_attention  # noqa: F401  (registers the attention functions)
from gpu_sections import SECTIONS
from gpu_sections.common import Skip, Suite
from gpu_sections.report import write

logger = logging.getLogger("gpu_suite")

#: The package's heavier dependencies: none of them may be needed here (recorded, and checked by the CI test).
OPTIONAL_MODULES = ("datasets", "peft", "matplotlib", "evaluate", "rouge_score", "jieba", "gguf", "tensorboard",
                    "wandb", "trackio")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--output", required=True, help="folder for gpu_suite.json and gpu_suite.md")
    parser.add_argument("--tiny", action="store_true", help="toy sizes, any device (CPU by default): a smoke test")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    parser.add_argument("--model", default=None, help="local folder of a real checkpoint to check as well")
    parser.add_argument("--sections", default=None,
                        help=f"comma-separated section numbers to run (default all: 1-{len(SECTIONS)})")
    args = parser.parse_args(argv)
    args.device = args.device or ("cpu" if args.tiny else "cuda")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device is visible to torch; run with --tiny for the CPU smoke test")
    if not args.tiny and torch.device(args.device).type != "cuda":
        parser.error("full sizes (an 8B-shaped model at 32K-128K tokens) need a CUDA device; use --tiny on the CPU")
    if args.model and not Path(args.model).expanduser().is_dir():
        parser.error(f"--model {args.model} is not a folder (a local checkpoint is needed: nothing is downloaded)")
    wanted = range(1, len(SECTIONS) + 1)
    if args.sections:
        try:
            wanted = sorted({int(item) for item in args.sections.split(",") if item.strip()})
        except ValueError:
            parser.error(f"--sections {args.sections!r}: expected numbers such as 1,3,5")
        if not wanted or any(not 1 <= item <= len(SECTIONS) for item in wanted):
            parser.error(f"--sections {args.sections!r}: sections are numbered 1 to {len(SECTIONS)}")
    args.wanted = list(wanted)
    return args


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001  not installed
        return None


def metadata(suite: Suite, argv: list[str]) -> dict:
    return dict(
        started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        command=shlex.join(["python", "benchmarks/gpu_suite.py", *argv]),
        device=str(suite.device),
        device_name=torch.cuda.get_device_name(suite.device) if suite.cuda else "cpu",
        torch=torch.__version__, transformers=transformers.__version__, accelerate=_version("accelerate"),
        flash_attn=_version("flash-attn"), cuda=torch.version.cuda, python=sys.version.split()[0],
        dtype=str(suite.dtype).replace("torch.", ""), tiny=suite.tiny, model=suite.model_path,
        shapes=suite.shapes(), seconds=0.0)


def run_section(suite: Suite, module) -> dict:
    about = (module.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
    start = time.perf_counter()
    try:
        result = module.run(suite)
        failed = [item for item in result["checks"] if not item["passed"]]
        section = dict(status="failed" if failed else "ok", **result)
    except Skip as skip:
        section = dict(status="skipped", reason=str(skip))
    except Exception as error:  # noqa: BLE001  one section's failure must not stop the others
        logger.exception("section failed")
        section = dict(status="error", reason=f"{type(error).__name__}: {error}"[:500],
                       traceback=traceback.format_exc()[-4000:])
    suite.empty_cache()
    return dict(section, about=about, seconds=time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.tiny and torch.device(args.device).type == "cpu":
        torch.set_num_threads(1)  # toy-sized ops gain nothing from threads, and on a busy CPU spinning ones cost 50x
    suite = Suite.create(args.device, args.tiny, args.model)
    result = dict(meta=metadata(suite, argv), sections={})
    output = Path(args.output)
    start = time.perf_counter()
    for number, (name, module) in enumerate(SECTIONS, start=1):
        if number not in args.wanted:
            continue
        logger.info("section %s ...", name)
        result["sections"][name] = section = run_section(suite, module)
        logger.info("section %s: %s (%.1f s)", name, section["status"], section["seconds"])
        result["meta"]["seconds"] = time.perf_counter() - start
        result["meta"]["optional_modules_loaded"] = sorted(m for m in OPTIONAL_MODULES if m in sys.modules)
        write(result, output)  # after every section: a run cut short still leaves its results
    json_path, md_path = write(result, output)
    print(md_path.read_text(encoding="utf-8"))
    logger.info("wrote %s and %s", json_path, md_path)
    return 0 if all(s["status"] in ("ok", "skipped") for s in result["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())

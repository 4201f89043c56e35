"""Retrieval-head detection speed: `--method probe` vs `--method reference` on the same grid, in one run.

Each method runs in its own subprocess (so peak memory is its own): the reference loop (eager decode with
`output_attentions=True`, full prefill per trial), the probe without the shared-prefix cache, and the probe as
shipped. Prints wall time, the speed ratio against the reference, peak memory (RSS on CPU, allocated on CUDA), and
whether the head-score files are identical. Writes benchmarks/results/detect_speed.json and .md.

    python benchmarks/detect_speed.py                      # SmolLM2, 2K tokens, depths 0..100 step 25
    python benchmarks/detect_speed.py --lengths 1000,2000 --depths 0:100:10
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = {"reference": ("reference", True), "probe (no prefix reuse)": ("probe", False), "probe": ("probe", True)}


def worker(args: argparse.Namespace) -> None:
    import torch

    from selective_attention.loading import load_model
    from selective_attention.needle.detect import DetectConfig, detect
    from selective_attention.needle.needles import resolve_needles

    if args.threads:
        torch.set_num_threads(args.threads)
    method, reuse = VARIANTS[args.worker]
    model, tokenizer = load_model(args.model, device=args.device)
    config = DetectConfig(lengths=args.lengths, depths=args.depths, needles=resolve_needles(args.needles),
                          method=method, max_new_tokens=args.max_new_tokens, reuse_prefix=reuse)
    if torch.cuda.is_available() and model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = detect(model, tokenizer, config, args.output, model_name="benchmark", progress=False)
    seconds = time.perf_counter() - start
    if model.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
        memory = "cuda max allocated"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        memory = "process peak RSS"
    tokens = sum(len(r["response_ids"]) for r in result.meta["trials"])
    print(json.dumps({"seconds": seconds, "peak_mib": peak, "memory": memory, "trials": result.new_trials,
                      "generated_tokens": tokens, "counted": result.meta["counted_trials"]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--lengths", default="2000")
    parser.add_argument("--depths", default="0:100:25")
    parser.add_argument("--needles", default="sf")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch's default)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--output", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    from selective_attention.commands.detect import parse_numbers

    raw_lengths, raw_depths = args.lengths, args.depths
    args.lengths, args.depths = parse_numbers(args.lengths, int), parse_numbers(args.depths)
    if args.worker:
        worker(args)
        return

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in VARIANTS:
            output = Path(tmp) / f"{name.replace(' ', '_')}.json"
            command = [sys.executable, __file__, "--worker", name, "--output", str(output), "--lengths", raw_lengths,
                       "--depths", raw_depths, "--needles", args.needles, "--max-new-tokens", str(args.max_new_tokens),
                       "--threads", str(args.threads)]
            if args.model:
                command += ["--model", args.model]
            if args.device:
                command += ["--device", args.device]
            print(f"running {name} ...", flush=True)
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
            rows[name] = json.loads(done.stdout.strip().splitlines()[-1])
            rows[name]["scores"] = json.loads(output.read_text())
            meta = json.loads(output.with_name(output.stem + ".meta.json").read_text())
            rows[name]["responses"] = [r["response_ids"] for r in meta["trials"]]

    base = rows["reference"]
    report = {"model": args.model or "SmolLM2-135M-Instruct (embedded)", "lengths": args.lengths, "depths": args.depths,
              "needles": args.needles, "max_new_tokens": args.max_new_tokens, "threads": args.threads or "default",
              "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "methods": {}}
    for name, row in rows.items():
        report["methods"][name] = {
            "seconds": round(row["seconds"], 2), "speedup_vs_reference": round(base["seconds"] / row["seconds"], 2),
            "peak_mib": round(row["peak_mib"], 1), "memory": row["memory"], "trials": row["trials"],
            "generated_tokens": row["generated_tokens"], "counted_trials": row["counted"],
            "scores_identical_to_reference": row["scores"] == base["scores"],
            "answers_identical_to_reference": row["responses"] == base["responses"],
        }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "detect_speed.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# Retrieval-head detection: probe vs reference", "",
             f"Model {report['model']}, context lengths {args.lengths}, depths {args.depths}, needles {args.needles}, "
             f"max {args.max_new_tokens} new tokens, torch threads {report['threads']}, {report['machine']}.",
             "Command: `python benchmarks/detect_speed.py " + " ".join(sys.argv[1:]) + "`", "",
             "| method | seconds | speed-up vs reference | peak memory (MiB) | identical scores | identical answers |",
             "|---|---:|---:|---:|:---:|:---:|"]
    for name, row in report["methods"].items():
        lines.append(f"| {name} | {row['seconds']} | {row['speedup_vs_reference']}x | {row['peak_mib']} "
                     f"({row['memory']}) | {'yes' if row['scores_identical_to_reference'] else 'NO'} | "
                     f"{'yes' if row['answers_identical_to_reference'] else 'NO'} |")
    (RESULTS / "detect_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

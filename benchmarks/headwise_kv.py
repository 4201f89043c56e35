"""Head-wise KV cache against DynamicCache on the embedded SmolLM2 (30 layers x 3 KV heads), in one run.

For each context (essay text) and each variant: a fresh process (so that peak RSS belongs to that run alone)
loads the model, prefills the context in one forward or in chunks, measures the cache's bytes from its tensors,
then times greedy decode steps. Variants: DynamicCache; head-wise cache with the top retrieval KV heads full
(shipped SmolLM2 scores), the others sink + window. Ratios are against DynamicCache at the same context and
prefill mode; run order is interleaved so that load from other processes spreads over all variants.

    python benchmarks/headwise_kv.py [--contexts 2048 4096 8192] [--decode-tokens 12] [--chunk 512]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
logger = logging.getLogger("headwise_kv")


def status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS: resident now, VmHWM: peak since the last reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def context_ids(tokenizer, length: int) -> torch.Tensor:
    from selective_attention.needle.haystack import load_haystack_text

    ids = tokenizer(load_haystack_text(), add_special_tokens=False)["input_ids"][:length]
    if len(ids) < length:
        raise ValueError(f"haystack too short for {length} tokens")
    return torch.tensor([ids])


@torch.inference_mode()
def run_one(length: int, variant: str, chunk: int | None, args: argparse.Namespace) -> dict:
    """One measurement in this process: prefill, cache bytes, decode ms/token, peak RSS during the run."""
    from transformers import DynamicCache

    from selective_attention.cache import cache_bytes, headwise_cache, prefill
    from selective_attention.heads import model_head_scores
    from selective_attention.loading import load_model
    from selective_attention.modeling import cache_kwargs

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    ids = context_ids(tokenizer, length)
    config = model.config
    if variant == "dynamic":
        cache, described = DynamicCache(config=config), "DynamicCache"
    else:
        scores, _ = model_head_scores(args.head_scores, args.model, config.num_hidden_layers,
                                      config.num_attention_heads)
        cache = headwise_cache(model, scores, full=args.full, sink=args.sink, window=args.window)
        described = cache.policy.describe()
    rss_before = status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the peak below belongs to this run
    started = time.perf_counter()
    output = prefill(model, cache, ids, chunk=chunk)
    prefill_s = time.perf_counter() - started
    after_prefill = cache_bytes(cache)
    token = output.logits[:, -1:].argmax(-1)
    steps = []
    for _ in range(args.decode_tokens):
        started = time.perf_counter()
        output = model(input_ids=token, **cache_kwargs(cache), use_cache=True)
        steps.append(time.perf_counter() - started)
        token = output.logits[:, -1:].argmax(-1)
    return {"context": length, "variant": variant, "chunk": chunk, "policy": described, "prefill_s": prefill_s,
            "cache_bytes_after_prefill": after_prefill, "cache_bytes_after_decode": cache_bytes(cache),
            "decode_ms_per_token": 1000 * statistics.median(steps[1:] or steps),
            "peak_rss_mib": status_kib("VmHWM") / 1024, "peak_rss_increase_mib": (status_kib("VmHWM") - rss_before) / 1024,
            "threads": torch.get_num_threads()}


def child(length: int, variant: str, chunk: int | None, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--one", str(length), variant, str(chunk or 0),
               "--decode-tokens", str(args.decode_tokens), "--full", str(args.full), "--sink", str(args.sink),
               "--window", str(args.window), "--threads", str(args.threads)]
    for flag, value in (("--model", args.model), ("--head-scores", args.head_scores)):
        if value:
            command += [flag, value]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command[2:6])} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "w") as stream:
        stream.write(text)
    os.replace(temporary, path)


def add_ratios(rows: list[dict]) -> None:
    baseline = {(r["context"], r["chunk"]): r for r in rows if r["variant"] == "dynamic"}
    for row in rows:
        base = baseline[(row["context"], row["chunk"])]
        row["cache_ratio"] = row["cache_bytes_after_decode"] / base["cache_bytes_after_decode"]
        row["decode_speedup"] = base["decode_ms_per_token"] / row["decode_ms_per_token"]
        row["prefill_ratio"] = row["prefill_s"] / base["prefill_s"]
        row["peak_rss_increase_ratio"] = row["peak_rss_increase_mib"] / base["peak_rss_increase_mib"]


def markdown(result: dict) -> str:
    lines = [f"# Head-wise KV cache vs DynamicCache: {result['model']}", "",
             f"{result['machine']}, torch {result['torch']}, {result['threads']} threads, float32. Head-wise: "
             f"{result['rows'][-1]['policy'] if result['rows'] else ''} (top KV heads by the shipped retrieval "
             f"scores). Prefill in one forward or in chunks of {result['chunk']}; then {result['decode_tokens']} "
             "greedy decode steps (median ms/token). Peak RSS increase: resident memory peak during prefill + "
             "decode over the resident size before it (model loaded), one process per row. Ratios against "
             "DynamicCache at the same context and prefill mode.", "",
             "| context | cache | prefill | cache MiB | cache ratio | peak RSS +MiB | RSS ratio | prefill s | "
             "prefill ratio | decode ms/tok | decode speedup |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(
            f"| {r['context']} | {r['variant']} | {'chunk ' + str(r['chunk']) if r['chunk'] else 'one forward'} | "
            f"{r['cache_bytes_after_decode'] / 2**20:.1f} | {r['cache_ratio']:.3f} | {r['peak_rss_increase_mib']:.0f} | "
            f"{r['peak_rss_increase_ratio']:.2f} | {r['prefill_s']:.1f} | {r['prefill_ratio']:.2f} | "
            f"{r['decode_ms_per_token']:.1f} | {r['decode_speedup']:.2f} |")
    lines += ["", f"Wall time of the whole run: {result['wall_s']:.0f} s. Load on the machine (other agents share its "
              f"2 cores) at the start: {result['load_average']}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--decode-tokens", type=int, default=12)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--full", type=float, default=0.25)
    parser.add_argument("--sink", type=int, default=64)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per run (1: steadiest timings on a machine shared with other jobs)")
    parser.add_argument("--model", default=None)
    parser.add_argument("--head-scores", default=None)
    parser.add_argument("--output", type=Path, default=RESULTS / "headwise_kv")
    parser.add_argument("--one", nargs=3, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        length, variant, chunk = args.one
        print(json.dumps(run_one(int(length), variant, int(chunk) or None, args)))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started, load = time.perf_counter(), os.getloadavg()
    rows = []
    for length in args.contexts:
        for chunk in (None, args.chunk):
            for variant in ("dynamic", "headwise") if len(rows) % 4 == 0 else ("headwise", "dynamic"):
                rows.append(child(length, variant, chunk, args))
                logger.info("%s", json.dumps(rows[-1]))
    rows.sort(key=lambda r: (r["context"], r["chunk"] or 0, r["variant"]))
    add_ratios(rows)
    result = {"model": args.model or "embedded SmolLM2-135M-Instruct", "machine": platform.machine(),
              "torch": torch.__version__, "threads": rows[0]["threads"], "decode_tokens": args.decode_tokens,
              "chunk": args.chunk, "full": args.full, "sink": args.sink, "window": args.window, "rows": rows,
              "wall_s": time.perf_counter() - started, "load_average": [round(v, 1) for v in load]}
    write_atomic(args.output.with_suffix(".json"), json.dumps(result, indent=2))
    write_atomic(args.output.with_suffix(".md"), markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()

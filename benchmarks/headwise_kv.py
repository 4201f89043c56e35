"""Head-wise KV cache against DynamicCache on the embedded SmolLM2 (30 layers x 3 KV heads), in one run.

For each context (essay text), three fresh processes (so that peak RSS belongs to that run alone): DynamicCache,
head-wise cache (top retrieval KV heads full by the shipped SmolLM2 scores, the others sink + window) prefilled in
one forward, and the same prefilled in chunks. Each measures prefill time, cache bytes (from the tensors) and peak
RSS. Decode speed is measured pairwise: the chunked head-wise process then loads a DynamicCache model too, and the
two decode alternately, step by step, so that load from other processes falls on both alike.

    python benchmarks/headwise_kv.py [--contexts 2048 4096 8192] [--decode-tokens 16] [--chunk 512]
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
    from selective_attention.retrieval.corpus import load_haystack_text

    ids = tokenizer(load_haystack_text(), add_special_tokens=False)["input_ids"][:length]
    if len(ids) < length:
        raise ValueError(f"haystack too short for {length} tokens")
    return torch.tensor([ids])


def build(args: argparse.Namespace, variant: str):
    """(model, tokenizer, empty cache, description) in this process for "dynamic" or "headwise"."""
    from transformers import DynamicCache

    from selective_attention.cache import headwise_cache
    from selective_attention.heads import model_head_scores
    from selective_attention.loading.loader import load_model

    model, tokenizer = load_model(args.model)
    config = model.config
    if variant == "dynamic":
        return model, tokenizer, DynamicCache(config=config), "DynamicCache"
    scores, _ = model_head_scores(args.head_scores, args.model, config.num_hidden_layers, config.num_attention_heads)
    cache = headwise_cache(model, scores, full=args.full, sink=args.sink, window=args.window)
    return model, tokenizer, cache, cache.policy.describe()


@torch.inference_mode()
def paired_decode(pairs: list, tokens: int) -> list[tuple[float, float]]:
    """Decode steps of several (model, cache, logits) alternately, order flipped every step, so that load from other
    processes falls on all of them alike. Returns per step the seconds of each."""
    from selective_attention.modeling import cache_kwargs

    feeds = [logits[:, -1:].argmax(-1) for _, _, logits in pairs]
    steps = []
    for step in range(tokens):
        times = [0.0] * len(pairs)
        order = range(len(pairs)) if step % 2 == 0 else reversed(range(len(pairs)))
        for index in order:
            model, cache, _ = pairs[index]
            started = time.perf_counter()
            output = model(input_ids=feeds[index], **cache_kwargs(cache), use_cache=True)
            times[index] = time.perf_counter() - started
            feeds[index] = output.logits[:, -1:].argmax(-1)
        steps.append(tuple(times))
    return steps


def run_one(length: int, variant: str, chunk: int | None, args: argparse.Namespace) -> dict:
    """One process: prefill, cache bytes, peak RSS of prefill + decode. With --paired (head-wise only) a
    DynamicCache model is then loaded too and both decode alternately for the decode ms/token comparison."""
    from selective_attention.cache import cache_bytes, prefill

    torch.set_num_threads(args.threads)
    model, tokenizer, cache, described = build(args, variant)
    ids = context_ids(tokenizer, length)
    with torch.inference_mode():  # page in the memory-mapped weights, so the RSS below is the run's own
        model(input_ids=ids[:, :16])
    rss_before = status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the peak below belongs to this run
    started = time.perf_counter()
    output = prefill(model, cache, ids, chunk=chunk)
    prefill_s = time.perf_counter() - started
    after_prefill = cache_bytes(cache)
    steps = paired_decode([(model, cache, output.logits)], args.decode_tokens)
    row = {"context": length, "variant": variant, "chunk": chunk, "policy": described, "prefill_s": prefill_s,
           "cache_bytes_after_prefill": after_prefill, "cache_bytes_after_decode": cache_bytes(cache),
           "peak_rss_mib": status_kib("VmHWM") / 1024,
           "peak_rss_increase_mib": (status_kib("VmHWM") - rss_before) / 1024, "threads": torch.get_num_threads()}
    if variant == "headwise" and args.paired:
        dense_model, _, dense_cache, _ = build(args, "dynamic")
        dense_output = prefill(dense_model, dense_cache, ids)
        steps = paired_decode([(model, cache, output.logits), (dense_model, dense_cache, dense_output.logits)],
                              args.decode_tokens)
        row.update(decode_ms_per_token=1000 * statistics.median(t for t, _ in steps),
                   dense_decode_ms_per_token=1000 * statistics.median(d for _, d in steps),
                   decode_speedup=statistics.median(d / t for t, d in steps))
    return row


def child(length: int, variant: str, chunk: int | None, args: argparse.Namespace, paired: bool = False) -> dict:
    command = [sys.executable, __file__, "--one", str(length), variant, str(chunk or 0),
               "--decode-tokens", str(args.decode_tokens), "--full", str(args.full), "--sink", str(args.sink),
               "--window", str(args.window), "--threads", str(args.threads)] + (["--paired"] if paired else [])
    for flag, value in (("--model", args.model), ("--head-scores", args.head_scores)):
        if value:
            command += [flag, value]
    # Freed blocks above 64 KiB go back to the OS: peak RSS then follows live tensors, not glibc's cached heap.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
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
    """Cache, peak-RSS and prefill ratios against the DynamicCache row (one forward) of the same context."""
    baseline = {r["context"]: r for r in rows if r["variant"] == "dynamic"}
    for row in rows:
        base = baseline[row["context"]]
        row["cache_ratio"] = row["cache_bytes_after_decode"] / base["cache_bytes_after_decode"]
        row["prefill_ratio"] = row["prefill_s"] / base["prefill_s"]
        row["peak_rss_increase_ratio"] = row["peak_rss_increase_mib"] / base["peak_rss_increase_mib"]


def markdown(result: dict) -> str:
    rows = result["rows"]
    lines = [f"# Head-wise KV cache vs DynamicCache: {result['model']}", "",
             f"{result['machine']}, torch {result['torch']}, {result['threads']} thread(s), float32. Head-wise: "
             f"{next(r['policy'] for r in rows if r['variant'] == 'headwise')} (top KV heads by the shipped retrieval "
             f"scores). One process per row: prefill the context (essay text) in one forward or in chunks of "
             f"{result['chunk']}, then {result['decode_tokens']} greedy decode steps. Cache MiB: key/value tensors "
             "the cache holds after decoding, measured from the tensors. Peak RSS +MiB: resident-memory peak during "
             "prefill + decode over the resident size before it (model loaded; glibc returns freed blocks above 64 KiB "
             "to the OS, MALLOC_MMAP_THRESHOLD_=65536, so the peak follows live tensors rather than the allocator's "
             "cached heap). Ratios against DynamicCache (one forward) at the same context.", "",
             "| context | cache | prefill | cache MiB | cache ratio | peak RSS +MiB | RSS ratio | prefill s | "
             "prefill ratio |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['context']} | {r['variant']} | {'chunks of ' + str(r['chunk']) if r['chunk'] else 'one forward'} | "
            f"{r['cache_bytes_after_decode'] / 2**20:.1f} | {r['cache_ratio']:.3f} | {r['peak_rss_increase_mib']:.0f} "
            f"| {r['peak_rss_increase_ratio']:.2f} | {r['prefill_s']:.1f} | {r['prefill_ratio']:.2f} |")
    lines += ["", f"Decode: a head-wise and a DynamicCache model decode {result['decode_tokens']} steps in one process, "
              "alternating step by step (order flipped every step), so that load from other jobs falls on both; "
              "speedup = median over steps of dense ms / head-wise ms.", "",
              "| context | head-wise ms/token | DynamicCache ms/token | decode speedup |", "|---|---|---|---|"]
    for r in rows:
        if "decode_speedup" in r:
            lines.append(f"| {r['context']} | {r['decode_ms_per_token']:.1f} | {r['dense_decode_ms_per_token']:.1f} | "
                         f"{r['decode_speedup']:.2f} |")
    lines += ["", f"Wall time of the whole run: {result['wall_s']:.0f} s; load average of the machine (2 cores shared "
              f"with other jobs) at the start: {result['load_average']}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--decode-tokens", type=int, default=16)
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
    parser.add_argument("--paired", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        length, variant, chunk = args.one
        print(json.dumps(run_one(int(length), variant, int(chunk) or None, args)))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started, load = time.perf_counter(), os.getloadavg()
    rows = []
    for length in args.contexts:
        for variant, chunk in (("dynamic", None), ("headwise", None), ("headwise", args.chunk)):
            rows.append(child(length, variant, chunk, args, paired=chunk is not None))
            logger.info("%s", json.dumps(rows[-1]))
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

"""Prefill overhead of masked-head attention against plain SDPA, measured in one run.

Interleaves the variants in every repetition so that machine noise hits them alike, and reports the median of
per-repetition time ratios. Usage: python benchmarks/masked_overhead.py [--tokens 2048] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import random
import statistics
import time
from pathlib import Path

import torch

from selective_attention import mask_heads
from selective_attention.loading import assets
from selective_attention.loading.loader import load_model

RESULTS = Path(__file__).parent / "results"


def prefill_seconds(model, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS / "masked_overhead")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    model, tokenizer = load_model(args.model)
    text = "".join(p.read_text() for p in sorted(assets.haystack_dir().glob("*.txt"))[:10])
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[:, : args.tokens]
    config = model.config
    every_head = [(l, h) for l in range(config.num_hidden_layers) for h in range(config.num_attention_heads)]
    heads = random.Random(0).sample(every_head, args.heads)

    variants = ["sdpa", "sa_masked_sdpa:none", "sa_masked_sdpa:zero", "sa_masked_sdpa:uniform", "sa_masked_sdpa:mean"]
    times: dict[str, list[float]] = {v: [] for v in variants}
    prefill_seconds(model, ids)  # warm-up
    for _ in range(args.repeats):
        for variant in variants:
            if variant == "sdpa":
                times[variant].append(prefill_seconds(model, ids))
                continue
            mode = variant.split(":")[1]
            if mode == "none":
                model.set_attn_implementation("sa_masked_sdpa")
                times[variant].append(prefill_seconds(model, ids))
                model.set_attn_implementation("sdpa")
            else:
                with mask_heads(model, heads, mode=mode):
                    times[variant].append(prefill_seconds(model, ids))

    baseline = times["sdpa"]
    rows = []
    for variant in variants:
        ratios = [t / b for t, b in zip(times[variant], baseline)]
        rows.append({"variant": variant, "median_s": statistics.median(times[variant]),
                     "median_ratio_vs_sdpa": statistics.median(ratios)})
    result = {"model": str(args.model or assets.MODEL_NAME), "tokens": int(ids.shape[1]), "masked_heads": len(heads),
              "repeats": args.repeats, "torch_threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = [f"# Masked-head prefill overhead ({result['tokens']} tokens, {len(heads)} heads masked, "
             f"{args.repeats} repeats, {result['torch_threads']} threads)", "",
             "| variant | median prefill (s) | median ratio vs sdpa |", "|---|---|---|"]
    lines += [f"| {r['variant']} | {r['median_s']:.3f} | {r['median_ratio_vs_sdpa']:.3f} |" for r in rows]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""KV-cache bytes and decode speed of variable-group GQA variants against the original model, same run.

Variants of the embedded SmolLM2 (30 layers, 9 query heads, 3 KV heads) made with `convert_model`:
original; 1 KV head in the last half of the layers (mean); 1 KV head everywhere (MQA, mean); 9 everywhere
(MHA, duplicate). For each context length: prefill the context (essay text), measure the cache's bytes, then
time greedy decode steps. The cache ratio must equal sum(per-layer KV heads) / sum(original) exactly.

    python benchmarks/gqa_kv_cache.py [--contexts 2048 4096] [--decode-tokens 32] [--model M]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from selective_attention.loading.loader import load_model
from selective_attention.modeling import cache_kwargs, output_cache
from selective_attention.gqa.convert import calibration_token_ids, convert_model

logger = logging.getLogger("gqa_kv_cache")
RESULTS = Path(__file__).parent / "results"


def variants(layers: int) -> dict[str, tuple[str, str] | None]:
    half = ",".join(f"{layer}:1" for layer in range(layers // 2, layers))
    return {"original": None, "1 KV head, last half of layers": (half, "mean"),
            "1 KV head, all layers (MQA)": ("all:1", "mean"), "9 KV heads, all layers (MHA)": ("all:9", "duplicate")}


def context_ids(tokenizer, length: int) -> torch.Tensor:
    from selective_attention.loading import assets

    texts = [path.read_text(encoding="utf-8") for path in sorted(assets.haystack_dir().glob("*.txt"))[:20]]
    ids = calibration_token_ids(tokenizer, texts, length)
    if ids.shape[1] < length:
        raise ValueError(f"haystack too short for {length} tokens")
    return ids


@torch.inference_mode()
def measure(model, ids: torch.Tensor, decode_tokens: int) -> dict:
    start = time.perf_counter()
    output = model(ids, use_cache=True)
    prefill = time.perf_counter() - start
    cache = output_cache(output)
    cache_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    heads = [layer.keys.shape[1] for layer in cache.layers]
    token = output.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(decode_tokens):
        output = model(token, **cache_kwargs(cache), use_cache=True)
        token = output.logits[:, -1:].argmax(-1)
    decode = time.perf_counter() - start
    return {"prefill_s": prefill, "cache_bytes": cache_bytes, "cache_kv_heads": heads,
            "decode_tokens_per_s": decode_tokens / decode}


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "w") as stream:
        stream.write(text)
    os.replace(temporary, path)


def markdown(result: dict) -> str:
    lines = [f"# GQA KV cache: {result['model']}", "",
             f"{result['machine']}, torch {result['torch']}, threads {result['threads']}, dtype float32, sdpa, "
             f"{result['decode_tokens']} greedy decode steps after a prefill of the context.", "",
             "| context | variant | KV heads (sum) | cache MiB | cache ratio | expected ratio | decode tok/s | speed ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['context']} | {row['variant']} | {row['kv_heads_sum']} | {row['cache_bytes'] / 2**20:.1f} "
                     f"| {row['cache_ratio']:.4f} | {row['expected_ratio']:.4f} | {row['decode_tokens_per_s']:.1f} "
                     f"| {row['speed_ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=RESULTS / "gqa_kv_cache")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    source, tokenizer = load_model(args.model, dtype="float32")
    layers = source.config.num_hidden_layers
    models = {}
    for name, spec in variants(layers).items():
        if spec is None:
            models[name] = source
        else:
            models[name], _ = convert_model(source, spec[0], spec[1], tokenizer=tokenizer, calibration_tokens=256)
    rows = []
    for context in args.contexts:
        ids = context_ids(tokenizer, context)
        baseline = None
        for name, model in models.items():
            logger.info("context %d: %s", context, name)
            measured = measure(model, ids, args.decode_tokens)
            counts = getattr(model.config, "num_key_value_heads_per_layer", None) or \
                [model.config.num_key_value_heads] * layers
            if measured["cache_kv_heads"] != counts:
                raise AssertionError(f"{name}: cache holds {measured['cache_kv_heads']} heads, config says {counts}")
            if baseline is None:
                baseline = {"bytes": measured["cache_bytes"], "heads": sum(counts), "speed": measured["decode_tokens_per_s"]}
            row = {"context": context, "variant": name, "kv_heads_per_layer": counts, "kv_heads_sum": sum(counts),
                   **measured, "cache_ratio": measured["cache_bytes"] / baseline["bytes"],
                   "expected_ratio": sum(counts) / baseline["heads"],
                   "speed_ratio": measured["decode_tokens_per_s"] / baseline["speed"]}
            if row["cache_bytes"] * baseline["heads"] != baseline["bytes"] * sum(counts):
                raise AssertionError(f"{name}: cache bytes are not sum(KV heads)/original exactly")
            rows.append(row)
            print(f"{context:>5} {name:<34} KV heads {sum(counts):>3}  cache {row['cache_bytes'] / 2**20:7.1f} MiB "
                  f"(x{row['cache_ratio']:.4f}, expected x{row['expected_ratio']:.4f})  "
                  f"decode {row['decode_tokens_per_s']:6.1f} tok/s (x{row['speed_ratio']:.2f})", flush=True)
    result = {"model": str(args.model or "embedded SmolLM2-135M-Instruct"), "torch": torch.__version__,
              "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "threads": torch.get_num_threads(),
              "decode_tokens": args.decode_tokens, "rows": rows}
    write_atomic(args.out.with_suffix(".json"), json.dumps(result, indent=2))
    write_atomic(args.out.with_suffix(".md"), markdown(result))
    print(f"wrote {args.out.with_suffix('.json')} and .md")


if __name__ == "__main__":
    main()

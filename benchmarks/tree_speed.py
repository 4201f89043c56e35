"""One decode step of attention alone: dense SDPA vs the tree kernel's `bound` and seed methods.

Model-shaped (9 query heads, 3 KV heads, d = 64, batch 1). The key tree is built once per length outside the
timed region (in a real decode it is maintained incrementally: appending a key costs O(log n) node updates), so
the timings are those of one step. Keys are random Gaussian by default, or `--real` keys captured from the
embedded SmolLM2 at layer 15 tiled to the length. Prints and writes minimum (and median) times and ratios against dense SDPA
measured in the same run: benchmarks/results/tree_speed.{json,md}.

    python benchmarks/tree_speed.py --threads 1 --lengths 1024 4096 16384 32768 65536
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import selective_attention  # noqa: F401
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from selective_attention.tree_kernel import TreeKernelConfig, tree_attention

RESULTS = Path(__file__).parent / "results"


def min_ms(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return min(times)


def paired_times_ms(fn, baseline, repeats: int) -> tuple[list[float], list[float]]:
    """Times of `fn` and `baseline` timed alternately, so load from other processes hits both alike."""
    fn(), baseline()
    ours, theirs = [], []
    for _ in range(repeats):
        for sink, call in ((ours, fn), (theirs, baseline)):
            start = time.perf_counter()
            call()
            sink.append((time.perf_counter() - start) * 1e3)
    return ours, theirs


def real_keys(length: int, layer: int = 15):
    """(q, k, v) from the embedded model on PG essays, tiled to `length` keys."""
    from selective_attention import assets
    from selective_attention.loading import load_model

    model, tokenizer = load_model()
    text = "".join(p.read_text() for p in sorted(assets.haystack_dir().glob("*.txt"))[:4])
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :1024]
    with torch.inference_mode():
        out = model(ids, use_cache=True)
    layer_cache = out.past_key_values.layers[layer]
    key, value = layer_cache.keys, layer_cache.values
    reps = -(-length // key.shape[2])
    key, value = key.repeat(1, 1, reps, 1)[:, :, :length], value.repeat(1, 1, reps, 1)[:, :, :length]
    query = key[:, :, -1:].repeat_interleave(3, 1) + 0.5 * torch.randn(1, 9, 1, key.shape[-1])
    return query.contiguous(), key.contiguous(), value.contiguous()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 32768, 65536])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.1])
    parser.add_argument("--leaf-blocks", type=int, nargs="+", default=[16, 8])
    parser.add_argument("--sharings", nargs="+", default=["kv_group"])
    parser.add_argument("--tree-descent", action="store_true", help="also time the level-by-level descent")
    parser.add_argument("--seed-methods", nargs="*", default=["alignment", "favor+"])
    parser.add_argument("--seed-exponents", type=float, nargs="*", default=[0.5])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--real", action="store_true", help="keys captured from the embedded SmolLM2")
    parser.add_argument("--output", default=str(RESULTS / "tree_speed"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for length in args.lengths:
        if args.real:
            query, key, value = real_keys(length)
        else:
            query, key, value = torch.randn(1, 9, 1, 64), torch.randn(1, 3, length, 64), torch.randn(1, 3, length, 64)

        class Attention(nn.Module):
            is_causal = True
            num_key_value_groups = 3
            layer_idx = 0

        attention = Attention()

        def dense():
            # exactly what a transformers model with attn_implementation="sdpa" runs for this step
            return sdpa_attention_forward(attention, query, key, value, None, scaling=0.125)[0]

        with torch.inference_mode():
            dense_ms = min_ms(dense, args.repeats)
            reference = dense()
            rows.append(dict(length=length, method="dense_sdpa", budget="all", ms=dense_ms, ratio=1.0, error=0.0))
            configs = []
            for fraction in args.fractions:
                for leaf in args.leaf_blocks:
                    for sharing in args.sharings:
                        for estimate in ("mean", "none"):
                            configs.append((f"bound/flat/b{leaf}/{sharing}/{estimate}", fraction, TreeKernelConfig(
                                method="bound", fraction=fraction, leaf_block=leaf, sharing=sharing,
                                estimate=estimate)))
                if args.tree_descent:
                    configs.append((f"bound/tree/b{args.leaf_blocks[0]}/kv_group/mean", fraction, TreeKernelConfig(
                        method="bound", fraction=fraction, leaf_block=args.leaf_blocks[0], sharing="kv_group",
                        descent="tree")))
            for method in args.seed_methods:
                for exponent in args.seed_exponents:
                    configs.append((method, f"E={exponent}", TreeKernelConfig(method=method, exponent=exponent)))
            for name, budget, config in configs:
                holder = nn.Module()
                holder.layer_idx = 0
                tree_attention(query, key, value, None, config, module=holder)  # builds the tree once
                step = lambda: tree_attention(query, key, value, None, config, module=holder)  # noqa: E731
                repeats = args.repeats if config.method == "bound" else max(3, args.repeats // 5)
                ours, theirs = paired_times_ms(step, dense, repeats)
                # on a shared, oversubscribed CPU a run is often preempted: the minimum is the uncontended time,
                # the median is reported beside it
                ms, baseline = min(ours), min(theirs)
                median, median_dense = statistics.median(ours), statistics.median(theirs)
                error = float((step()[0] - reference).abs().max())
                config.stats.reset()
                step()
                rows.append(dict(length=length, method=name, budget=budget, ms=ms, ratio=baseline / ms, error=error,
                                 dense_ms_paired=baseline, median_ms=median, median_dense_ms=median_dense,
                                 median_ratio=median_dense / median, exact_fraction=config.stats.exact_fraction))
                print(f"{length:>6} {name:<30} {str(budget):<6} min {ms:8.2f} ms  x{baseline / ms:5.2f} vs dense "
                      f"(min {baseline:.2f} ms; medians {median:.2f} / {median_dense:.2f} ms)  max|err| {error:.3g}  "
                      f"exact keys {config.stats.exact_fraction:.3f}", flush=True)
    crossover = {}
    for row in rows:
        if row["method"].startswith("bound") and row["ratio"] >= 1.0:
            key_name = f"{row['method']} fraction={row['budget']}"
            crossover[key_name] = min(crossover.get(key_name, row["length"]), row["length"])
    result = dict(device="cpu", threads=torch.get_num_threads(), real_keys=args.real, leaf_blocks=args.leaf_blocks,
                  rows=rows, first_length_faster_than_dense=crossover, torch=torch.__version__)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(output.with_suffix(".json"))
    lines = [f"# Tree-kernel decode attention speed (CPU, {torch.get_num_threads()} threads, "
             f"{'real SmolLM2 keys' if args.real else 'random keys'})", "",
             "| keys | method | budget | min ms | dense min ms (paired) | speed-up vs dense SDPA (min) | "
             "speed-up (medians) | max abs err | exact keys |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['length']} | {row['method']} | {row['budget']} | {row['ms']:.2f} | "
                     f"{row.get('dense_ms_paired', row['ms']):.2f} | {row['ratio']:.2f} | "
                     f"{row.get('median_ratio', 1.0):.2f} | "
                     f"{row['error']:.3g} | {row.get('exact_fraction', 1.0):.3f} |")
    lines += ["", "First length at which each bound setting beats dense SDPA: "
              + (", ".join(f"{k}: {v}" for k, v in sorted(crossover.items())) or "none")]
    output.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

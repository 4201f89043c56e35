"""Decode attention with a growing KV cache: dense SDPA vs the tree kernel's selectors, every per-step cost counted.

Model-shaped (SmolLM2: 9 query heads, 3 KV heads, d = 64, batch 1, float32). The cache is a preallocated buffer
of which each step sees one more key (the view a static cache gives), and each step calls the attention function
exactly as a model layer does in `generate`: the tree kernel's step includes maintaining its key tree (a new leaf
block and its ancestors every `leaf_block` steps), the block bounds, the candidate gather, the exact scores, the
estimate terms and its cost counters. The tree is built once from the prompt before the timed steps (that is the
prefill's cost, reported separately). Dense SDPA (`sdpa_attention_forward`, what transformers runs) is timed on the
same views in the same run, alternating with each method step by step. Each step is timed twice: the process's
CPU time (`time.process_time`: the work itself, not counting time the scheduler gives other processes, which on a
shared machine dominates wall time) and wall time; the speed-ups are dense / method of the per-step medians.

    python benchmarks/tree_speed.py --threads 1 --lengths 8192 32768 65536 --budgets 2048

The memory floor is measured beside them: one pass over every key and value (a sum), what dense attention cannot
avoid reading; a method that reads a fraction f of those vectors cannot beat f times that floor.

`rescore` decode runs the fused C++ kernel (`tree_kernel/csrc`) unless a setting names its PyTorch twin.

Writes benchmarks/results/tree_speed.{json,md}: per method and length the median and minimum step time, the ratio
dense / method of each, the output error at the last step, and the vectors each step reads against dense's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from selective_attention.io import write_json, write_text
from selective_attention.tree_kernel import TreeKernelConfig, tree_attention
from selective_attention.tree_kernel.native import ENV_SWITCH, rescore_kernel

RESULTS = Path(__file__).parent / "results"
HEADS, KV_HEADS, DIM = 9, 3, 64


class Attention(nn.Module):
    is_causal = True
    num_key_value_groups = HEADS // KV_HEADS
    layer_idx = 0


def settings(budget: int, leaf_blocks: tuple[int, ...] = ()) -> list[tuple[str, TreeKernelConfig, bool]]:
    """(name, config, fused): `fused` lets `rescore` decode run the C++ kernel (else its PyTorch twin). Each of
    `leaf_blocks` adds the chosen selector (x4, mix, mean, fused) with leaves of that many keys."""
    return [
        ("bound/kv_group/none", TreeKernelConfig(method="bound", budget=budget, sharing="kv_group", estimate="none"),
         False),
        ("rescore/x4/mix/mean (torch ops)", TreeKernelConfig(method="rescore", budget=budget, rank="mix"), False),
        ("rescore/x4/mix/mean (fused)", TreeKernelConfig(method="rescore", budget=budget, rank="mix"), True),
        ("rescore/x2/mix/mean (fused)", TreeKernelConfig(method="rescore", budget=budget, candidates=2, rank="mix"),
         True),
        ("rescore/x2/mix/none (fused)", TreeKernelConfig(method="rescore", budget=budget, candidates=2, rank="mix",
                                                         estimate="none"), True),
    ] + [(f"rescore/x4/mix/mean/b{leaf} (fused)",
          TreeKernelConfig(method="rescore", budget=budget, rank="mix", leaf_block=leaf), True) for leaf in leaf_blocks]


def vectors_read(config: TreeKernelConfig, costs: dict, length: int) -> float:
    """d-wide vectors one step reads per KV head, as a fraction of dense (every key and value once).

    blocks ranked: one kbox row (2 vectors) per block for rank "bound", ksum (1) for "mean", both (3) for "mix";
    estimate terms: ksum + vsum per block (vsum alone when the rank read ksum); rescored keys: one each (per KV
    head when the candidates are shared by the group, else per query head); values: one per kept key and query
    head."""
    group = HEADS // KV_HEADS
    blocks = costs["bounds"]
    ranked = {"bound": 2, "mean": 1, "mix": 3}[config.rank] * blocks
    estimate = (2 if config.rank == "bound" else 1) * blocks if config.estimate == "mean" else 0
    per_key = 1 if config.sharing in ("kv_group", "all") else group
    keys = costs["rescored"] * per_key
    # values counted per query head, as the fused kernel reads them (a value kept by several heads of a group is
    # read again, usually from cache)
    values = costs["exact"] * (group if config.method == "rescore" else per_key)
    return (ranked + estimate + keys + values) / (2 * length)


def inputs(length: int, steps: int, real: torch.Tensor | None, generator: torch.Generator):
    """query per step (steps, 1, HEADS, 1, DIM), key/value buffers (1, KV_HEADS, length + steps, DIM)."""
    total = length + steps
    if real is None:
        key = torch.randn(1, KV_HEADS, total, DIM, generator=generator)
        value = torch.randn(1, KV_HEADS, total, DIM, generator=generator)
        queries = torch.randn(steps, 1, HEADS, 1, DIM, generator=generator)
        return queries, key, value
    key, value, query = real
    reps = -(-total // key.shape[2])
    key, value = key.repeat(1, 1, reps, 1)[:, :, :total], value.repeat(1, 1, reps, 1)[:, :, :total]
    rows = torch.randint(0, query.shape[2], (steps,), generator=generator)
    return query[:, :, rows].permute(2, 0, 1, 3)[:, :, :, None].contiguous(), key.contiguous(), value.contiguous()


def real_tensors(layer: int = 15, tokens: int = 2048) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """key, value (1, KV_HEADS, tokens, DIM) and the last 512 queries (1, HEADS, 512, DIM) of the embedded
    SmolLM2 at `layer` on the essays, post-RoPE, captured through a registered attention function."""
    from selective_attention.loading.loader import load_model
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from selective_attention.tree_kernel.evaluation import load_tokens

    captured = {}

    def capture(module, query, key, value, attention_mask, **kwargs):
        if module.layer_idx == layer:
            captured.update(query=query[:, :, -512:].float(), key=key.float(), value=value.float())
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("bench_capture_sdpa", capture)
    AttentionMaskInterface.register("bench_capture_sdpa", sdpa_mask)
    model, tokenizer = load_model()
    model.set_attn_implementation("bench_capture_sdpa")
    ids = load_tokens(tokenizer, None, None, tokens)[:tokens]
    with torch.inference_mode():
        model.base_model(input_ids=ids[None], use_cache=False)
    return captured["key"], captured["value"], captured["query"]


def read_once(key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Every key and value read once (a sum): the memory-traffic floor of dense decode attention."""
    return key.sum() + value.sum()


def run_length(length: int, budget: int, steps: int, real, seed: int, leaf_blocks: tuple[int, ...] = ()
               ) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    queries, key, value = inputs(length, steps, real, generator)
    attention = Attention()

    def dense(step: int) -> torch.Tensor:
        end = length + step + 1
        return sdpa_attention_forward(attention, queries[step], key[:, :, :end], value[:, :, :end], None,
                                      scaling=DIM ** -0.5)[0]

    rows = []
    with torch.inference_mode():
        dense(0)
        for name, config, fused in settings(budget, leaf_blocks):
            os.environ[ENV_SWITCH] = "1" if fused else "0"
            holder = nn.Module()
            start = time.perf_counter()
            tree_attention(queries[0], key[:, :, :length], value[:, :, :length], None, config, module=holder)
            build_ms = (time.perf_counter() - start) * 1e3
            config.stats.reset()
            ours, theirs, floor, ours_wall, theirs_wall, floor_wall = [], [], [], [], [], []
            for step in range(steps):
                end = length + step + 1
                for cpu, wall, call in ((ours, ours_wall, lambda: tree_attention(
                        queries[step], key[:, :, :end], value[:, :, :end], None, config, module=holder)),
                                        (theirs, theirs_wall, lambda: dense(step)),
                                        (floor, floor_wall, lambda: read_once(key[:, :, :end], value[:, :, :end]))):
                    begin, begin_wall = time.process_time(), time.perf_counter()
                    out = call()
                    cpu.append((time.process_time() - begin) * 1e3)
                    wall.append((time.perf_counter() - begin_wall) * 1e3)
                    if cpu is ours:
                        got = out[0]
            error = float((got - dense(steps - 1)).abs().max())
            costs = config.stats.summary()["past_budget"]
            rows.append(dict(length=length, budget=budget, method=name, config=config.to_dict(), fused=fused,
                             steps=steps,
                             median_ms=statistics.median(ours), dense_median_ms=statistics.median(theirs),
                             ratio_median=statistics.median(theirs) / statistics.median(ours),
                             wall_median_ms=statistics.median(ours_wall),
                             dense_wall_median_ms=statistics.median(theirs_wall),
                             ratio_wall=statistics.median(theirs_wall) / statistics.median(ours_wall),
                             read_floor_ms=statistics.median(floor), error=error, costs=costs,
                             vectors_read_vs_dense=vectors_read(config, costs, length), tree_build_ms=build_ms))
            row = rows[-1]
            print(f"{length:>6} {name:<32} CPU {row['median_ms']:7.2f} ms vs dense {row['dense_median_ms']:7.2f} "
                  f"(x{row['ratio_median']:.2f}; wall x{row['ratio_wall']:.2f})  reads "
                  f"{row['vectors_read_vs_dense']:.3f} of dense  max|err| {error:.3g}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 65536])
    parser.add_argument("--budgets", type=int, nargs="+", default=[2048])
    parser.add_argument("--steps", type=int, default=48, help="decode steps timed per method (one key added each)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--real", action="store_true", help="keys and values of the embedded SmolLM2, tiled")
    parser.add_argument("--seed", type=int, default=0, help="random seed of keys and queries")
    parser.add_argument("--leaf-blocks", type=int, nargs="*", default=[],
                        help="also time the fused x4 mix/mean selector with leaves of these many keys (default 16)")
    parser.add_argument("--output", default=str(RESULTS / "tree_speed"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if rescore_kernel() is None:
        raise SystemExit("the fused rescore kernel did not build (see the warning above); it is what this compares")
    real = real_tensors() if args.real else None
    rows = [row for budget in args.budgets for length in args.lengths
            for row in run_length(length, budget, args.steps, real, args.seed, tuple(args.leaf_blocks))]
    output = Path(args.output)
    load = [round(x, 2) for x in os.getloadavg()]
    write_json(output.with_suffix(".json"), dict(device="cpu", threads=args.threads, real_keys=args.real,
                                                 torch=torch.__version__, load_average=load, rows=rows))
    lines = [f"# Tree-kernel decode attention vs dense SDPA (CPU, {args.threads} thread(s), "
             f"{'real SmolLM2 keys' if args.real else 'random keys'}, {args.steps} steps, load average {load[0]})", "",
             "Times are per-step medians of the process's CPU time (wall time beside it: it adds the time other "
             "processes ran).", "",
             "| keys | budget | method | CPU ms | dense CPU ms | speed-up (CPU) | speed-up (wall) | "
             "vectors read / dense | read-once floor ms | dense / floor | max abs err | tree build ms (prefill, wall) |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['length']} | {row['budget']} | {row['method']} | {row['median_ms']:.2f} | "
                     f"{row['dense_median_ms']:.2f} | {row['ratio_median']:.2f} | {row['ratio_wall']:.2f} | "
                     f"{row['vectors_read_vs_dense']:.3f} | {row['read_floor_ms']:.2f} | "
                     f"{row['dense_median_ms'] / row['read_floor_ms']:.2f} | {row['error']:.3g} | "
                     f"{row['tree_build_ms']:.0f} |")
    write_text(output.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

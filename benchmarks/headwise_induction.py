"""Induction and echo scores of the embedded SmolLM2's query heads (RazorAttention's other heads worth keeping).

A sequence of random tokens is repeated once; in the second copy, an induction head attends from position i to the
token after the previous occurrence of token i (i - L + 1), an echo head to the previous occurrence itself (i - L).
Score = mean attention weight on that key over the second copy, averaged over a few sequences (eager attention,
one forward each). Writes Retrieval_Head-format files ({"L-H": [score]}) for the head-wise cache's selection:
induction, echo, and retrieval combined with them (each score divided by its maximum, then the maximum of the three).

    python benchmarks/headwise_induction.py --retrieval docs/results/headwise/smollm2_head_scores_large.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "docs" / "results" / "headwise"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--half", type=int, default=300, help="random tokens per copy")
    parser.add_argument("--sequences", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--retrieval", type=Path, help="retrieval head-score file to combine with")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()

    from selective_attention.heads import (
        load_head_scores,
        mean_scores,
        save_head_scores,
    )
    from selective_attention.loading import load_model

    torch.set_num_threads(1)
    model, _ = load_model()
    model.set_attn_implementation("eager")
    config = model.config
    layers, heads, half = config.num_hidden_layers, config.num_attention_heads, args.half
    generator = torch.Generator().manual_seed(args.seed)
    induction = torch.zeros(layers, heads)
    echo = torch.zeros(layers, heads)
    rows = torch.arange(half, 2 * half)
    for _ in range(args.sequences):
        tokens = torch.randint(1000, config.vocab_size - 1000, (half,), generator=generator)
        ids = torch.cat([tokens, tokens])[None]
        with torch.inference_mode():
            attentions = model(input_ids=ids, output_attentions=True).attentions
        for layer, weights in enumerate(attentions):  # (1, heads, 2 half, 2 half)
            induction[layer] += weights[0][:, rows[1:], rows[1:] - half + 1].mean(-1) / args.sequences
            echo[layer] += weights[0][:, rows, rows - half].mean(-1) / args.sequences
    meta = {"model": "SmolLM2-135M-Instruct", "num_layers": layers, "num_heads": heads,
            "num_key_value_heads": config.num_key_value_heads,
            "settings": {"half": half, "sequences": args.sequences, "seed": args.seed},
            "how": "benchmarks/headwise_induction.py: mean attention on the induction (i-L+1) / echo (i-L) key over "
                   "the second copy of a repeated random-token sequence"}
    args.output.mkdir(parents=True, exist_ok=True)
    files = {"induction": induction, "echo": echo}
    for name, matrix in files.items():
        scores = {f"{layer}-{head}": [round(float(matrix[layer, head]), 6)]
                  for layer in range(layers) for head in range(heads)}
        save_head_scores(args.output / f"smollm2_{name}_scores.json", scores, {**meta, "score": name})
    summary = {name: sorted(((f"{layer}-{head}", round(float(matrix[layer, head]), 3))
                             for layer in range(layers) for head in range(heads)), key=lambda x: -x[1])[:15]
               for name, matrix in files.items()}
    if args.retrieval:
        retrieval = torch.zeros(layers, heads)
        for (layer, head), value in mean_scores(load_head_scores(args.retrieval)).items():
            retrieval[layer, head] = value
        combined = torch.stack([m / m.max() for m in (retrieval, induction, echo)]).amax(0)
        scores = {f"{layer}-{head}": [round(float(combined[layer, head]), 6)]
                  for layer in range(layers) for head in range(heads)}
        save_head_scores(args.output / "smollm2_combined_scores.json", scores,
                         {**meta, "score": f"max of retrieval ({args.retrieval.name}), induction and echo, each / "
                                           "its maximum"})
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

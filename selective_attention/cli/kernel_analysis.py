"""`selective-attention kernel-analysis`: how well each feature map estimates exp(q.k / sqrt d).

For unit directions q, k at cosine c (norms fixed by --query-norm / --key-norm), draws `--trials` independent
feature maps and reports the mean, std and std/mean of <phi(q), phi(k)> against the exact exp(q.k / sqrt d).
For FAVOR+ it also prints the closed form Var/E^2 = (2/R)(cosh(|q+k|^2 / sqrt d) - 1) (exact for i.i.d. rows).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from selective_attention.io import write_json
from selective_attention.plots.kernels import plot_kernel_estimates
from selective_attention.tree_kernel.feature_maps import (
    FEATURE_MAPS,
    favor_relative_variance,
    feature_map,
    random_features,
)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("kernel-analysis", help="mean/std of feature-map estimates of the softmax kernel")
    parser.add_argument("--methods", nargs="+", default=list(FEATURE_MAPS), choices=FEATURE_MAPS)
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--R", type=int, default=128)
    parser.add_argument("--orthogonal", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--query-norm", type=float, default=8.0)
    parser.add_argument("--key-norm", type=float, default=8.0)
    parser.add_argument("--scaling", type=float, default=1.0, help="extra factor on q and k")
    parser.add_argument("--points", type=int, default=41)
    parser.add_argument("--trials", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="results/kernel_analysis")
    parser.set_defaults(func=run)


def pair_at_cosine(d: int, cosine: float, q_norm: float, k_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.zeros(d, dtype=torch.float64)
    q[0] = 1.0
    k = torch.zeros(d, dtype=torch.float64)
    k[0], k[1] = cosine, math.sqrt(max(0.0, 1 - cosine**2))
    return q * q_norm, k * k_norm


def analyse(method: str, d: int, rows: int, orthogonal: bool, q_norm: float, k_norm: float, scaling: float,
            cosines: list[float], trials: int, seed: int) -> dict:
    """Per cosine: exact kernel, mean/std of the estimate over `trials` feature draws, and FAVOR+'s closed form."""
    out = {"cosine": cosines, "exact": [], "mean": [], "std": [], "ratio": [], "closed_form_ratio": []}
    pairs = [pair_at_cosine(d, c, q_norm * scaling, k_norm * scaling) for c in cosines]
    queries = torch.stack([p[0] for p in pairs]) / d**0.25
    keys = torch.stack([p[1] for p in pairs]) / d**0.25
    estimates = []
    for trial in range(trials):
        random_features.cache_clear() if trial == 0 else None
        features = random_features(method, d, rows, seed * 100003 + trial, orthogonal=orthogonal)
        estimates.append((feature_map(queries, features) * feature_map(keys, features)).sum(-1))
    estimates = torch.stack(estimates)  # (trials, points)
    exact = torch.exp((queries * keys).sum(-1))
    mean, std = estimates.mean(0), estimates.std(0)
    out["exact"], out["mean"], out["std"] = exact.tolist(), mean.tolist(), std.tolist()
    out["ratio"] = (std / mean.abs().clamp(min=1e-300)).tolist()
    if method == "favor+":
        raw_q, raw_k = queries * d**0.25, keys * d**0.25
        out["closed_form_ratio"] = favor_relative_variance(raw_q, raw_k, rows).sqrt().tolist()
    return out


def run(args: argparse.Namespace) -> int:
    cosines = torch.linspace(-1, 1, args.points).tolist()
    results = {m: analyse(m, args.d, args.R, args.orthogonal, args.query_norm, args.key_norm, args.scaling, cosines,
                          args.trials, args.seed) for m in args.methods}
    output = Path(args.output)
    settings = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()
                if key != "func"}
    write_json(output.with_suffix(".json"), dict(settings=settings, results=results))
    plot_kernel_estimates(results, cosines, args.methods, output.with_suffix(".png"),
                          f"d={args.d} R={args.R} |q|={args.query_norm} |k|={args.key_norm} orthogonal={args.orthogonal}")
    lines = []
    for method, r in results.items():
        for target in (-1.0, 0.0, 1.0):
            i = min(range(len(cosines)), key=lambda j: abs(cosines[j] - target))
            closed = f" closed-form {r['closed_form_ratio'][i]:.4g}" if r["closed_form_ratio"] else ""
            lines.append(f"{method:<20} cos={target:+.0f}: exact {r['exact'][i]:.4g} mean {r['mean'][i]:.4g} "
                         f"std {r['std'][i]:.4g} std/mean {r['ratio'][i]:.4g}{closed}")
    print("\n".join(lines))
    return 0

"""Feature maps that estimate the softmax kernel exp(q.k / sqrt d) from sums of per-key features.

The tree kernel's sampled methods score an unexpanded node from the *sum* of its keys' features, so the only maps
that help are those with <phi(q), sum_k phi(k)> ~ sum_k kernel(q, k). All maps take inputs already divided by
d^(1/4) (so that q.k / sqrt d = <q', k'>), and are drawn ONCE per (d, R, seed): the originating code redrew its
projection at every token, which made FAVOR+/RFF estimates uncorrelated with the alignment they were meant to track.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

FEATURE_MAPS = ("favor+", "favor+relu", "positive_alignment", "rff")


def orthogonal_gaussian(d: int, rows: int, generator: torch.Generator, orthogonal: bool = True) -> torch.Tensor:
    """(rows, d) projection whose rows are N(0, I_d) draws, made exactly orthogonal within blocks of d.

    Orthogonal blocks keep each row's chi-distributed norm (so each row is still marginally Gaussian) but remove
    the correlations between rows, which lowers the variance of kernel estimates (Performer, Choromanski 2021).
    """
    gaussian = torch.randn(rows, d, generator=generator, dtype=torch.float64)
    if not orthogonal:
        return gaussian
    blocks = []
    for start in range(0, rows, d):
        size = min(d, rows - start)
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
        blocks.append(q.T[:size])
    norms = torch.randn(rows, d, generator=generator, dtype=torch.float64).norm(dim=1, keepdim=True)
    return torch.cat(blocks) * norms


@dataclass(frozen=True)
class RandomFeatures:
    """A fixed draw of random features: projection (R, d) and, for RFF, phases (R,)."""

    kind: str
    projection: torch.Tensor
    phases: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return self.projection.shape[0] if self.kind != "positive_alignment" else 0


@lru_cache(maxsize=64)
def random_features(kind: str, d: int, num_features: int | None = None, seed: int = 0,
                    orthogonal: bool = True, antithetic: bool = True) -> RandomFeatures:
    """The fixed feature draw for (kind, d, R, seed); R defaults to 2d (antithetic pairs for FAVOR+)."""
    if kind not in FEATURE_MAPS:
        raise ValueError(f"unknown feature map {kind!r}; expected one of {', '.join(FEATURE_MAPS)}")
    if d < 1:
        raise ValueError(f"feature dimension must be >= 1, got {d}")
    rows = num_features or 2 * d
    if rows < 1:
        raise ValueError(f"number of random features must be >= 1, got {rows}")
    generator = torch.Generator().manual_seed(seed)
    if kind == "positive_alignment":
        return RandomFeatures(kind, torch.empty(0, d, dtype=torch.float64))
    if kind == "favor+" and antithetic and rows % 2 == 0:
        half = orthogonal_gaussian(d, rows // 2, generator, orthogonal)
        return RandomFeatures(kind, torch.cat([half, -half]))
    projection = orthogonal_gaussian(d, rows, generator, orthogonal)
    phases = torch.rand(rows, generator=generator, dtype=torch.float64) * 2 * math.pi if kind == "rff" else None
    return RandomFeatures(kind, projection, phases)


def feature_map(x: torch.Tensor, features: RandomFeatures) -> torch.Tensor:
    """phi(x) in float64 for x (..., d) already scaled by d^(-1/4); <phi(q), phi(k)> estimates the kernel.

    - favor+: exp(w.x - |x|^2/2) / sqrt(R), unbiased for exp(q.k), positive;
    - favor+relu: relu(w.x) / sqrt(R), positive, a different (ReLU) kernel;
    - positive_alignment: [relu(x), relu(-x)] (deterministic), <.,.> <= |q.k|-ish surrogate of q.k;
    - rff: sqrt(2/R) exp(|x|^2/2) cos(w.x + b), unbiased for exp(q.k) but signed.
    """
    x = x.to(torch.float64)
    kind = features.kind
    if kind == "positive_alignment":
        return torch.cat([x.clamp(min=0), (-x).clamp(min=0)], dim=-1)
    if x.shape[-1] != features.projection.shape[1]:
        raise ValueError(f"feature map built for d={features.projection.shape[1]}, got inputs with d={x.shape[-1]}")
    projection = features.projection.to(x.device)
    rows = projection.shape[0]
    projected = x @ projection.T
    if kind == "favor+":
        return torch.exp(projected - 0.5 * x.pow(2).sum(-1, keepdim=True)) / math.sqrt(rows)
    if kind == "favor+relu":
        return projected.clamp(min=0) / math.sqrt(rows)
    phases = features.phases.to(x.device)
    return math.sqrt(2.0 / rows) * torch.exp(0.5 * x.pow(2).sum(-1, keepdim=True)) * torch.cos(projected + phases)


def favor_relative_variance(q: torch.Tensor, k: torch.Tensor, num_features: int) -> torch.Tensor:
    """Closed form Var/E^2 = (2/R)(cosh(|q+k|^2 / sqrt d) - 1) of antithetic FAVOR+ with *i.i.d.* rows.

    Derivation: one antithetic pair averages exp(w.u) and exp(-w.u) with u = (q+k)/d^(1/4); E = exp(|u|^2/2) and
    E[cosh(w.u)^2] = (1 + e^{2|u|^2})/2, so one pair has Var/E^2 = cosh(|u|^2) - 1 and the mean of R/2 pairs
    divides that by R/2. Orthogonal rows only lower it.
    Inputs are raw (unscaled) q, k of dimension d.
    """
    d = q.shape[-1]
    squared = (q + k).to(torch.float64).pow(2).sum(-1) / math.sqrt(d)
    return (2.0 / num_features) * (torch.cosh(squared) - 1.0)

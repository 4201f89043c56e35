"""What `sa_tree_kernel` computes: the method names, the budget rule, and the running cost counters."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

#: the originating paper's sampled descent (leaf = one key, buds drawn in proportion to each method's mass)
SAMPLED_METHODS = ("alignment", "positive_alignment", "favor+", "favor+relu", "rff", "time-decay", "uniform")
#: selectors that attend chosen keys exactly (budget in keys, at least `min_keys`)
SELECTORS = ("topk", "bound", "rescore")
METHODS = ("dense",) + SELECTORS + SAMPLED_METHODS
SHARING = ("per_head", "kv_group", "all")
ESTIMATES = ("none", "mean")
DESCENTS = ("flat", "tree")
#: how `bound` and `rescore` rank blocks: Quest's upper bound [q+, -q-] . [kmax, -kmin], q . (block mean key), or
#: the average of the two ("mix": the bound overrates blocks of spread-out keys, the mean underrates one outlier)
RANKS = ("bound", "mean", "mix")
#: sampled methods whose node estimate targets exp(q.k / sqrt d); the others only steer sampling, and their
#: unexpanded buds are represented by the centroid score exp(q . k_mean) (documented in docs/tree_kernel.md).
EXP_SCALE_METHODS = ("alignment", "positive_alignment", "favor+", "rff")
FEATURE_METHODS = {"positive_alignment": "positive_alignment", "favor+": "favor+", "favor+relu": "favor+relu",
                   "rff": "rff"}


#: per-row cost counters, each summed over rows (and averaged over the heads that make their own selection)
COUNTERS = ("rows", "visible", "exact", "terms", "bounds", "rescored")


@dataclass
class Tally:
    """Sums over query rows: visible keys; keys attended exactly (their values read); softmax terms (exact keys
    plus estimate terms); block bounds evaluated; keys scored exactly to choose among candidates."""

    rows: float = 0.0
    visible: float = 0.0
    exact: float = 0.0
    terms: float = 0.0
    bounds: float = 0.0
    rescored: float = 0.0

    def per_row(self) -> dict[str, float] | None:
        """Averages per row (None without rows)."""
        return {name: getattr(self, name) / self.rows for name in COUNTERS[1:]} if self.rows else None


@dataclass
class TreeStats:
    """Running cost counters: `all` rows, and `past` the rows that see more keys than their budget."""

    all: Tally = field(default_factory=Tally)
    past: Tally = field(default_factory=Tally)

    def add(self, visible: torch.Tensor, budgets: torch.Tensor | None, exact: torch.Tensor,
            terms: torch.Tensor | None = None, bounds: torch.Tensor | None = None,
            rescored: torch.Tensor | None = None) -> None:
        """Per-row counts, each (B, Q) (already averaged over selection heads); missing terms = exact, missing
        rescored = exact (a selector that scores only what it keeps), missing bounds = 0."""
        visible = visible.double()
        zeros = torch.zeros_like(visible)
        counts = torch.stack([torch.ones_like(visible), visible, exact.double().expand_as(visible),
                              (terms if terms is not None else exact).double().expand_as(visible),
                              bounds.double().expand_as(visible) if bounds is not None else zeros,
                              (rescored if rescored is not None else exact).double().expand_as(visible)]).flatten(1)
        past = (budgets < visible).double().flatten() if budgets is not None else zeros.flatten()
        sums = torch.stack([counts.sum(1), counts @ past]).tolist()  # one transfer for both tallies
        for tally, values in zip((self.all, self.past), sums):
            for name, value in zip(COUNTERS, values):
                setattr(tally, name, getattr(tally, name) + value)

    def add_rows(self, rows: int, visible: float, budget: float, exact: float, terms: float, bounds: float,
                 rescored: float) -> None:
        """`rows` rows with the same counts (a decode step of a batch without padding): `add` without tensors."""
        counts = dict(rows=rows, visible=rows * visible, exact=rows * exact, terms=rows * terms,
                      bounds=rows * bounds, rescored=rows * rescored)
        for tally in (self.all, self.past) if budget < visible else (self.all,):
            for name, value in counts.items():
                setattr(tally, name, getattr(tally, name) + value)

    @property
    def rows(self) -> float:
        return self.all.rows

    @property
    def visible(self) -> float:
        return self.all.visible

    @property
    def exact(self) -> float:
        return self.all.exact

    @property
    def exact_fraction(self) -> float:
        return self.all.exact / self.all.visible if self.all.visible else float("nan")

    @property
    def terms_fraction(self) -> float:
        return self.all.terms / self.all.visible if self.all.visible else float("nan")

    def summary(self) -> dict[str, dict[str, float] | None]:
        """Per-row averages of every counter, over all rows and over the rows past the budget."""
        return {"all": self.all.per_row(), "past_budget": self.past.per_row()}

    def reset(self) -> None:
        self.all, self.past = Tally(), Tally()


@dataclass
class TreeKernelConfig:
    """How `sa_tree_kernel` approximates attention.

    Budget (exact keys for topk/bound/rescore, buds for sampled methods) per query row with l visible keys:
    `budget` keys, else ceil(`fraction` * l), else ceil(l ** `exponent`); at least `min_keys`, at most l. Sampled
    methods default to exponent 0.5, the selectors (topk, bound, rescore) to fraction 0.1.
    """

    method: str = "bound"
    exponent: float | None = None
    fraction: float | None = None
    budget: int | None = None
    leaf_block: int = 16  # keys per leaf of the bound tree (sampled methods use single-key leaves)
    layers: tuple[int, ...] | None = None  # None: every layer
    seed: int = 0  # random seed: feature draws and the sampled descent's Gumbel noise
    sharing: str | None = None  # per_head | kv_group | all; default per_head (bound/topk), all (sampled methods)
    estimate: str = "mean"  # bound, rescore: add the estimated mass of the keys not attended exactly
    min_keys: int = 16
    num_features: int | None = None  # R of the random feature maps (default 2d)
    decay: float = 0.99  # time-decay base b
    parallel: int | None = None  # buds expanded per step P (default 2^floor(log2(1024^(E/2))))
    beam: float = 4.0  # descent="tree": internal levels keep beam * W nodes (big nodes' bounds are loose)
    descent: str = "flat"  # bound: "flat" scores every leaf block's bound at once; "tree" descends level by level
    sink_blocks: int = 1  # bound: first leaf blocks always kept (attention sink), counted in the budget
    local_blocks: int = 1  # bound: most recent complete leaf blocks always kept, counted in the budget
    candidates: float = 4.0  # rescore: blocks holding candidates x budget keys (by rank) are scored exactly
    rank: str = "bound"  # bound, rescore: block score that picks blocks (bound | mean: q . k_mean | mix: their average)
    row_chunk: int = 256  # query rows processed together (memory bound of prefill)
    stats: TreeStats = field(default_factory=TreeStats, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown tree-kernel method {self.method!r}; expected one of {', '.join(METHODS)}")
        if self.exponent is not None and not 0 < self.exponent <= 1:
            raise ValueError(f"exponent must be in (0, 1], got {self.exponent}")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.budget is not None and self.budget < 1:
            raise ValueError(f"budget must be >= 1 key, got {self.budget}")
        if self.leaf_block < 1:
            raise ValueError(f"leaf_block must be >= 1, got {self.leaf_block}")
        if self.min_keys < 1:
            raise ValueError(f"min_keys must be >= 1, got {self.min_keys}")
        if self.candidates < 1:
            raise ValueError(f"candidates must be >= 1 (a multiple of the budget), got {self.candidates}")
        if self.sharing is None:
            self.sharing = {"rescore": "kv_group"}.get(self.method, "all" if self.method in SAMPLED_METHODS
                                                       else "per_head")
        if self.sharing not in SHARING:
            raise ValueError(f"unknown sharing {self.sharing!r}; expected one of {', '.join(SHARING)}")
        if self.estimate not in ESTIMATES:
            raise ValueError(f"unknown estimate {self.estimate!r}; expected one of {', '.join(ESTIMATES)}")
        if not 0 < self.decay < 1:
            raise ValueError(f"decay must be in (0, 1), got {self.decay}")
        if self.parallel is not None and self.parallel < 1:
            raise ValueError(f"parallel must be >= 1, got {self.parallel}")
        if self.beam < 1:
            raise ValueError(f"beam must be >= 1, got {self.beam}")
        if self.rank not in RANKS:
            raise ValueError(f"unknown rank {self.rank!r}; expected one of {', '.join(RANKS)}")
        if self.rank != "bound" and self.method == "bound" and self.descent == "tree":
            raise ValueError("the tree descent ranks nodes by their bound only (rank='bound')")
        if self.descent not in DESCENTS:
            raise ValueError(f"unknown descent {self.descent!r}; expected one of {', '.join(DESCENTS)}")
        if self.sink_blocks < 0 or self.local_blocks < 0:
            raise ValueError("sink_blocks and local_blocks must be >= 0")
        if self.row_chunk < 1:
            raise ValueError(f"row_chunk must be >= 1, got {self.row_chunk}")
        if self.layers is not None:
            self.layers = tuple(sorted({int(layer) for layer in self.layers}))

    @property
    def walks_prefixes(self) -> bool:
        """True for the methods that descend from each row's causal prefix roots (no window, no soft-capping)."""
        return self.method in SAMPLED_METHODS or (self.method == "bound" and self.descent == "tree")

    def applies_to(self, layer: int | None) -> bool:
        return self.layers is None or layer in self.layers

    def budgets(self, visible: torch.Tensor) -> torch.Tensor:
        """Per-row budget (same shape as `visible`, long)."""
        visible = visible.to(torch.float64)
        if self.budget is not None:
            keys = torch.full_like(visible, float(self.budget))
        elif self.fraction is not None:
            keys = torch.ceil(self.fraction * visible)
        else:
            exponent = self.exponent if self.exponent is not None else (
                0.5 if self.method in SAMPLED_METHODS else None)
            keys = torch.ceil(visible.clamp(min=1) ** exponent) if exponent is not None else torch.ceil(0.1 * visible)
        keys = keys.clamp(min=self.min_keys if self.method in SELECTORS else 1)
        return torch.minimum(keys, visible.clamp(min=0)).to(torch.long)

    def budget_for(self, visible: int) -> int:
        """`budgets` for one row count, in Python (a decode step needs one number, not a tensor)."""
        if self.budget is not None:
            keys = float(self.budget)
        elif self.fraction is not None:
            keys = float(math.ceil(self.fraction * visible))
        else:
            exponent = self.exponent if self.exponent is not None else (
                0.5 if self.method in SAMPLED_METHODS else None)
            keys = float(math.ceil(max(visible, 1) ** exponent)) if exponent is not None else float(
                math.ceil(0.1 * visible))
        keys = max(keys, self.min_keys if self.method in SELECTORS else 1)
        return int(min(keys, max(visible, 0)))

    def parallel_buds(self) -> int:
        """P: the originating rule 2^floor(log2(1024^(E/2))) is about sqrt(T) buds at l = 1024; with a budget of
        T buds, 2^floor(log2(sqrt(T)))."""
        if self.parallel is not None:
            return self.parallel
        if self.budget is not None and self.exponent is None:
            return 2 ** int(math.floor(math.log2(math.sqrt(self.budget))))
        exponent = self.exponent if self.exponent is not None else 0.5
        return 2 ** int(math.floor(math.log2(1024 ** (exponent / 2))))

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("stats")
        data["layers"] = list(self.layers) if self.layers is not None else None
        return data

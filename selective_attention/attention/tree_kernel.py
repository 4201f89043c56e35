"""Tree-kernel attention: find the high attention scores by descending a tree over the keys.

Registered as ``sa_tree_kernel`` (sdpa mask, head masks honoured). Configure a model with
`configure_tree_kernel(model, TreeKernelConfig(...))`; layers not selected run exact SDPA.

Methods
-------
- ``dense``: exact attention (the reference).
- ``topk``: exact per-row top-k keys (an oracle: computes every score), softmax over them only.
- ``bound``: every node keeps the element-wise min/max of its keys, so
  sum_i max(q_i min_i, q_i max_i) = q+ . max + q- . min bounds q.k for each key below it (Quest's page bound,
  applied hierarchically). Level by level, every row keeps its best `W` nodes (W = budget / leaf_block) among
  the children of the nodes it kept above plus its prefix root at this level; the kept leaf blocks (and the
  row's own partial block) are attended exactly. With ``estimate="mean"`` every node that was *not* kept adds its
  representative: leaf count n, mean value, score q.(mean key), i.e. weight n exp(q.k_mean). The discarded nodes
  plus the kept leaves partition the row's past exactly, so nothing is counted twice or lost.
- seed methods (``alignment``, ``positive_alignment``, ``favor+``, ``favor+relu``, ``rff``, ``time-decay``,
  ``uniform``): the seed's sampled descent with leaf = one key. Buds start at the row's prefix roots; P at a
  time are drawn without replacement (Gumbel top-k) in proportion to the method's mass and replaced by their
  children, until T = ceil(l^E) buds. Output = sum_b n_b w_b vmean_b / sum_b n_b w_b, where a single-key bud is
  scored exactly and a larger bud by the method's estimate of exp(q.k) per leaf.

Defects of the seed fixed here: the normaliser carries the leaf count n_b; the current token's own key is part
of its past; random features are drawn once per (d, R, seed); perplexity (see `tree-ppl`) scores true tokens.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..modeling import sliding_window_layers
from ..registry import register_attention
from ..tree.levels import KeyTree, prefix_roots
from .eager import exact_attention_forward
from .feature_maps import feature_map, random_features
from .masked import masked

logger = logging.getLogger(__name__)

NAME = "sa_tree_kernel"
CONFIG_ATTRIBUTE = "sa_tree_config"
TREE_ATTRIBUTE = "_sa_key_trees"
CONFIG_KEY = "sa_tree_kernel"

SEED_METHODS = ("alignment", "positive_alignment", "favor+", "favor+relu", "rff", "time-decay", "uniform")
METHODS = ("dense", "topk", "bound") + SEED_METHODS
SHARING = ("per_head", "kv_group", "all")
ESTIMATES = ("none", "mean")
DESCENTS = ("flat", "tree")
#: flat bound: up to this many query rows gather their blocks; more rows (prefill) mask one score matrix instead
GATHER_ROWS = 8
#: seed methods whose node estimate targets exp(q.k / sqrt d); the others only steer sampling, and their
#: unexpanded buds are represented by the centroid score exp(q . k_mean) (documented in docs/tree_kernel.md).
EXP_SCALE_METHODS = ("alignment", "positive_alignment", "favor+", "rff")
FEATURE_METHODS = {"positive_alignment": "positive_alignment", "favor+": "favor+", "favor+relu": "favor+relu",
                   "rff": "rff"}


@dataclass
class TreeStats:
    """Running totals over query rows x heads: visible keys, exactly scored keys, softmax terms."""

    rows: float = 0.0
    visible: float = 0.0
    exact: float = 0.0
    terms: float = 0.0

    def add(self, rows: float, visible: float, exact: float, terms: float) -> None:
        self.rows += rows
        self.visible += visible
        self.exact += exact
        self.terms += terms

    @property
    def exact_fraction(self) -> float:
        return self.exact / self.visible if self.visible else float("nan")

    @property
    def terms_fraction(self) -> float:
        return self.terms / self.visible if self.visible else float("nan")

    def reset(self) -> None:
        self.rows = self.visible = self.exact = self.terms = 0.0


@dataclass
class TreeKernelConfig:
    """How `sa_tree_kernel` approximates attention.

    Budget (exact keys for bound/topk, buds for seed methods) per query row with l visible keys: `budget` keys,
    else ceil(`fraction` * l), else ceil(l ** `exponent`); at least `min_keys`, at most l. Seed methods default
    to exponent 0.5, bound/topk to fraction 0.1.
    """

    method: str = "bound"
    exponent: float | None = None
    fraction: float | None = None
    budget: int | None = None
    leaf_block: int = 16  # keys per leaf of the bound tree (seed methods use single-key leaves)
    layers: tuple[int, ...] | None = None  # None: every layer
    seed: int = 0
    sharing: str | None = None  # per_head | kv_group | all; default per_head (bound/topk), all (seed methods)
    estimate: str = "mean"  # bound: add the estimated mass of the unselected nodes
    min_keys: int = 16
    num_features: int | None = None  # R of the random feature maps (default 2d)
    decay: float = 0.99  # time-decay base b
    parallel: int | None = None  # buds expanded per step P (default 2^floor(log2(1024^(E/2))))
    beam: float = 4.0  # descent="tree": internal levels keep beam * W nodes (big nodes' bounds are loose)
    descent: str = "flat"  # bound: "flat" scores every leaf block's bound at once; "tree" descends level by level
    sink_blocks: int = 1  # bound: first leaf blocks always kept (attention sink), counted in the budget
    local_blocks: int = 1  # bound: most recent complete leaf blocks always kept, counted in the budget
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
        if self.sharing is None:
            self.sharing = "all" if self.method in SEED_METHODS else "per_head"
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
        if self.descent not in DESCENTS:
            raise ValueError(f"unknown descent {self.descent!r}; expected one of {', '.join(DESCENTS)}")
        if self.sink_blocks < 0 or self.local_blocks < 0:
            raise ValueError("sink_blocks and local_blocks must be >= 0")
        if self.row_chunk < 1:
            raise ValueError(f"row_chunk must be >= 1, got {self.row_chunk}")
        if self.layers is not None:
            self.layers = tuple(sorted({int(layer) for layer in self.layers}))

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
            exponent = self.exponent if self.exponent is not None else (0.5 if self.method in SEED_METHODS else None)
            keys = torch.ceil(visible.clamp(min=1) ** exponent) if exponent is not None else torch.ceil(0.1 * visible)
        keys = keys.clamp(min=self.min_keys if self.method in ("bound", "topk") else 1)
        return torch.minimum(keys, visible.clamp(min=0)).to(torch.long)

    def parallel_buds(self) -> int:
        if self.parallel is not None:
            return self.parallel
        exponent = self.exponent if self.exponent is not None else 0.5
        return 2 ** int(math.floor(math.log2(1024 ** (exponent / 2))))

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("stats")
        data["layers"] = list(self.layers) if self.layers is not None else None
        return data


# ---------------------------------------------------------------------------------------------- small helpers
def _gather(buffer: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """buffer (B, H, N, X) contiguous, index (B, Hi, *rest) with Hi in {1, H} -> (B, H, *rest, X)."""
    batch, heads, nodes, width = buffer.shape
    base = (torch.arange(batch * heads, device=buffer.device) * nodes).view(batch, heads, *[1] * (index.dim() - 2))
    flat = (base + index).reshape(-1)
    return buffer.reshape(-1, width).index_select(0, flat).view(batch, heads, *index.shape[2:], width)


def _gather_count(buffer: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """buffer (B, N), index (B, *rest) -> (B, *rest)."""
    batch, nodes = buffer.shape
    base = (torch.arange(batch, device=buffer.device) * nodes).view(batch, *[1] * (index.dim() - 1))
    return buffer.reshape(-1).index_select(0, (base + index).reshape(-1)).view(index.shape)


def _reduce_heads(scores: torch.Tensor, sharing: str, how: str) -> torch.Tensor:
    """(B, Hkv, R, ...) per-head scores -> the selection groups' scores (B, Hs, S, ...)."""
    reduce = (lambda t, dims: t.amax(dims, keepdim=True)) if how == "max" else (
        lambda t, dims: t.logsumexp(dims, keepdim=True))
    if sharing == "per_head":
        return scores
    if sharing == "kv_group":
        return reduce(scores, (2,))
    return reduce(scores, (1, 2))


def _dot(query: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """query (B, Hkv, R, Q, D) . rows (B, Hkv, S, Q, C, D) with S in {1, R} -> (B, Hkv, R, Q, C)."""
    if rows.shape[2] == query.shape[2] and query.shape[2] != 1:
        return torch.einsum("bhsqd,bhsqcd->bhsqc", query, rows)
    return torch.einsum("bhrqd,bhqcd->bhrqc", query, rows[:, :, 0])


def _weighted(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """weights (B, Hkv, R, Q, C) x values (B, Hkv, S, Q, C, Dv) -> (B, Hkv, R, Q, Dv)."""
    if values.dim() == 4:  # (B, Hkv, C, Dv): the same terms for every row
        return torch.matmul(weights.flatten(2, 3), values).view(*weights.shape[:4], values.shape[-1])
    if values.shape[2] == weights.shape[2] and weights.shape[2] != 1:
        return torch.einsum("bhsqc,bhsqcv->bhsqv", weights, values)
    return torch.einsum("bhrqc,bhqcv->bhrqv", weights, values[:, :, 0])


class _Softmax:
    """Accumulates sum exp(logit) value over several groups of terms with one running maximum.

    With `softcap` (Gemma 2) every finite logit s becomes softcap * tanh(s / softcap), as the model's eager
    attention does; a monotonic map, so selections ranked on raw scores or bounds stay valid."""

    def __init__(self, softcap: float | None = None) -> None:
        self.parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.softcap = softcap

    def add(self, logits: torch.Tensor, values: torch.Tensor, counts: torch.Tensor | None = None) -> None:
        """Terms exp(logit) value; with `counts` (broadcast to logits) the terms are n exp(logit) (values / n)
        and `values` are the n-key sums, which saves dividing every node's sums by its count."""
        if self.softcap is not None:
            logits = torch.where(torch.isfinite(logits), torch.tanh(logits / self.softcap) * self.softcap, logits)
        self.parts.append((logits, values, counts))

    def result(self) -> torch.Tensor:
        maximum = None
        for logits, _, counts in self.parts:
            part = (logits if counts is None else logits + torch.log(counts)).amax(-1)
            maximum = part if maximum is None else torch.maximum(maximum, part)
        maximum = torch.where(torch.isfinite(maximum), maximum, torch.zeros_like(maximum))
        numerator, denominator = 0.0, 0.0
        for logits, values, counts in self.parts:
            weights = torch.exp(logits - maximum[..., None])
            numerator = numerator + _weighted(weights, values)
            denominator = denominator + (weights.sum(-1) if counts is None else (weights * counts).sum(-1))
        return numerator / denominator.clamp(min=1e-30)[..., None]


# ------------------------------------------------------------------------------------------------ the function
def _row_mask(attention_mask: torch.Tensor | None, batch: int, q_len: int, kv_len: int, device) -> torch.Tensor:
    """(B, Q, kv) bool: which keys each query row may see (causal when the mask is None)."""
    if attention_mask is None:
        positions = torch.arange(kv_len, device=device)
        rows = torch.arange(q_len, device=device) + (kv_len - q_len)
        return (positions[None, :] <= rows[:, None]).expand(batch, q_len, kv_len)
    mask = attention_mask[:, 0]
    if mask.dtype != torch.bool:
        mask = mask > torch.finfo(mask.dtype).min / 2
    return mask.expand(batch, q_len, kv_len)


def _trees(module: nn.Module) -> dict:
    trees = getattr(module, TREE_ATTRIBUTE, None)
    if trees is None:
        trees = {}
        setattr(module, TREE_ATTRIBUTE, trees)
    return trees


def _tree(module, config: TreeKernelConfig, key, value, key_valid, q_len: int, scaling: float) -> KeyTree:
    """The module's incrementally maintained tree for this method (rebuilt when the cache does not extend it)."""
    if config.method == "bound" and config.descent == "flat":
        spec = ("bound", config.leaf_block, ("ksum", "vsum", "kbox"), None)
    elif config.method == "bound":
        spec = ("bound", config.leaf_block, ("ksum", "vsum", "kmin", "kmax"), None)
    else:
        kind = FEATURE_METHODS.get(config.method)
        stats = ("ksum", "vsum", "feat") if kind else ("ksum", "vsum")
        spec = ("seed", 1, stats, (kind, key.shape[-1], config.num_features, config.seed, scaling) if kind else None)
    trees = _trees(module)
    tree = trees.get(spec)
    if tree is None:
        feature_fn = None
        if spec[3] is not None:
            features = random_features(spec[3][0], key.shape[-1], config.num_features, config.seed)
            root = math.sqrt(scaling)
            feature_fn = lambda keys: feature_map(keys * root, features)  # noqa: E731
        tree = trees[spec] = KeyTree(block=spec[1], stats=spec[2], feature_fn=feature_fn)
    return tree.update(key, value, key_valid, q_len)


def tree_kernel_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                          **kwargs) -> tuple[torch.Tensor, None]:
    """AttentionInterface function; exact SDPA for layers the module's `TreeKernelConfig` does not select."""
    config: TreeKernelConfig | None = getattr(module, CONFIG_ATTRIBUTE, None)
    softcap = kwargs.get("softcap")
    if config is None or config.method == "dense" or not config.applies_to(getattr(module, "layer_idx", None)):
        return exact_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                       **kwargs)
    return tree_attention(query, key, value, attention_mask, config, scaling=scaling, module=module, softcap=softcap)


def tree_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
                   config: TreeKernelConfig, scaling: float | None = None, module: nn.Module | None = None,
                   softcap: float | None = None) -> tuple[torch.Tensor, None]:
    """Approximate causal attention; query (B, Hq, Q, D), key/value (B, Hkv, kv, D) -> ((B, Q, Hq, Dv), None).

    `attention_mask`: None (causal) or a 4D bool/additive mask (B or 1, 1, Q, kv). Without `module` the key tree
    is built from scratch (the module carries the incremental tree between decode steps). `softcap`: attention
    logit soft-capping (Gemma 2), supported by dense, topk and flat bound.
    """
    batch, q_heads, q_len, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    if key.shape[-1] != dim:
        raise ValueError(f"query head dim {dim} does not match key head dim {key.shape[-1]}")
    if key.shape[:3] != value.shape[:3]:
        raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} disagree")
    if q_heads % kv_heads:
        raise ValueError(f"{q_heads} query heads are not a multiple of {kv_heads} key/value heads")
    if q_len > kv_len:
        raise ValueError(f"{q_len} queries but only {kv_len} keys")
    scaling = dim ** -0.5 if scaling is None else float(scaling)
    dtype = query.dtype
    query, key, value = query.float(), key.float().contiguous(), value.float().contiguous()
    rows = _row_mask(attention_mask, batch, q_len, kv_len, query.device)  # per-row visibility, window included
    key_valid = rows.any(1) if attention_mask is not None else None  # (B, kv) non-padding keys (builds the tree)
    positions = torch.arange(q_len, device=query.device) + (kv_len - q_len)
    windowed = False
    if key_valid is None:
        visible = (positions + 1).expand(batch, q_len)
    else:
        visible = rows.sum(-1)  # (B, Q): a sliding-window row sees fewer keys than its causal prefix
        windowed = bool((visible < key_valid.long().cumsum(1).gather(1, positions.expand(batch, q_len))).any())
    prefix_walk = config.method in SEED_METHODS or (config.method == "bound" and config.descent == "tree")
    if softcap is not None and prefix_walk:
        raise ValueError(f"tree-kernel method {config.method!r} (descent {config.descent!r}) does not support "
                         "attention logit soft-capping: use dense, topk or bound with descent='flat'")
    if windowed and prefix_walk:
        raise ValueError(f"tree-kernel method {config.method!r} (descent {config.descent!r}) walks causal prefixes "
                         "and cannot honour a sliding window: use dense, topk or bound with descent='flat', or "
                         "restrict `layers` to full-attention layers")
    n_rep = q_heads // kv_heads
    if config.method == "dense":
        keys, values = key.repeat_interleave(n_rep, 1), value.repeat_interleave(n_rep, 1)
        if softcap is None:
            output = torch.nn.functional.scaled_dot_product_attention(query, keys, values, attn_mask=rows[:, None],
                                                                      scale=scaling)
        else:  # (B, Hq, Q, kv) capped scores, as the model's eager attention computes them
            scores = torch.tanh(torch.matmul(query, keys.transpose(-1, -2)) * scaling / softcap) * softcap
            output = torch.matmul(torch.softmax(scores.masked_fill(~rows[:, None], float("-inf")), -1), values)
        config.stats.add(q_len * batch, float(visible.sum()), float(visible.sum()), float(visible.sum()))
        return output.transpose(1, 2).contiguous().to(dtype), None
    budgets = config.budgets(visible)
    grouped = query.view(batch, kv_heads, n_rep, q_len, dim)
    holder = module if module is not None else nn.Module()
    tree = None
    if config.method in ("bound",) + SEED_METHODS:
        tree = _tree(holder, config, key, value, key_valid, q_len, scaling)
    outputs = []
    for start in range(0, q_len, config.row_chunk):
        stop = min(q_len, start + config.row_chunk)
        part = (grouped[:, :, :, start:stop], positions[start:stop], rows[:, start:stop], budgets[:, start:stop],
                visible[:, start:stop])
        if config.method == "topk":
            out = _topk_rows(config, key, value, *part, scaling, softcap)
        elif config.method == "bound" and config.descent == "flat":
            out = _flat_bound_rows(config, tree, key, value, *part, scaling, windowed, softcap)
        elif config.method == "bound":
            out = _bound_rows(config, tree, key, value, key_valid, *part, scaling)
        else:
            out = _seed_rows(config, tree, key, value, key_valid, *part, scaling, getattr(module, "layer_idx", 0))
        outputs.append(out)
    output = torch.cat(outputs, dim=3).reshape(batch, q_heads, q_len, -1)
    return output.transpose(1, 2).contiguous().to(dtype), None


# -------------------------------------------------------------------------------------------------------- topk
def _topk_rows(config, key, value, query, positions, rows, budgets, visible, scaling, softcap=None):
    batch, kv_heads, n_rep, q_len, dim = query.shape
    scores = torch.einsum("bhrqd,bhkd->bhrqk", query, key) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~rows[:, None, None], float("-inf"))
    k = max(1, int(budgets.max()))
    top, order = scores.topk(min(k, scores.shape[-1]), dim=-1)
    keep = torch.arange(top.shape[-1], device=top.device) < budgets[:, None, None, :, None]
    top = top.masked_fill(~keep, float("-inf"))
    weights = torch.softmax(top, dim=-1).nan_to_num(0.0)
    dense = torch.zeros_like(scores).scatter_(-1, order, weights)
    kept = float(keep.expand(batch, 1, 1, q_len, keep.shape[-1]).sum())  # the same count for every head
    config.stats.add(q_len * batch, float(visible.sum()), kept, kept)
    return torch.einsum("bhrqk,bhkv->bhrqv", dense, value)


# ------------------------------------------------------------------------------------------------------- bound
def _scores(query: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
    """query (B, Hkv, R, Q, D) . nodes (B, Hkv, N, D) -> (B, Hkv, R, Q, N), one matmul per KV head."""
    batch, kv_heads, n_rep, q_len, dim = query.shape
    return torch.matmul(query.reshape(batch, kv_heads, n_rep * q_len, dim), nodes.transpose(-1, -2)).view(
        batch, kv_heads, n_rep, q_len, nodes.shape[2])


def _local_block(key, value, rows, positions, blocks, block, scaled, softmax) -> float:
    """Adds the row's own partial (incomplete) block, exactly; returns the number of keys it scored."""
    batch, kv_heads, dim = key.shape[0], key.shape[1], key.shape[-1]
    q_len = positions.shape[0]
    local = (blocks * block)[:, None] + torch.arange(block, device=key.device)  # (Q, block)
    local_ok = (local <= positions[:, None]) & (local < key.shape[2])
    local = local.clamp(max=key.shape[2] - 1)
    local_ok = local_ok[None].expand(batch, q_len, block) & rows.gather(2, local[None].expand(batch, -1, -1))
    local_keys = key[:, :, local.reshape(-1)].view(batch, kv_heads, 1, q_len, block, dim)
    local_values = value[:, :, local.reshape(-1)].view(batch, kv_heads, 1, q_len, block, value.shape[-1])
    softmax.add(_dot(scaled, local_keys).masked_fill(~local_ok[:, None, None], float("-inf")), local_values)
    return float(local_ok.sum())


def _flat_bound_rows(config, tree: KeyTree, key, value, query, positions, rows, budgets, visible, scaling,
                     windowed: bool, softcap: float | None = None):
    """Every complete leaf block's min/max bound in one matmul per KV head -> top-W blocks (sink and local
    blocks forced) -> exact softmax over their keys + the row's partial block (+ each other block's mean term).

    Visibility is per row (`rows`, (B, Q, kv)): under a sliding window a block may lie wholly or partly outside a
    row's window. Blocks the row cannot see are never chosen; a block it sees only in part is always computed
    exactly (its mean term would count keys outside the window); every exact key is masked by the row's own
    visibility.
    """
    batch, kv_heads, n_rep, q_len, dim = query.shape
    block, device, sharing = tree.block, query.device, config.sharing
    blocks = ((positions + 1) // block).clamp(max=tree.num_blocks)  # complete causal blocks per row (Q,)
    partial = positions + 1 - blocks * block
    wanted = torch.round((budgets - partial[None]).clamp(min=0).double() / block).long().clamp(min=1)  # (B, Q)
    scaled = query * scaling
    softmax = _Softmax(softcap)
    heads = (kv_heads if sharing != "all" else 1) * (n_rep if sharing == "per_head" else 1)
    exact, rest_terms = 0.0, 0.0
    if tree.num_blocks > 0 and int(blocks.max()) > 0:
        level = tree.level(0)
        count = level["count"]  # (B, N)
        nodes = torch.arange(count.shape[1], device=device)
        used = tree.num_blocks * block
        valid = (nodes < blocks[:, None])[None] & (count[:, None] > 0)  # (B, Q, N)
        forced = (nodes < config.sink_blocks)[None] | (nodes[None] >= blocks[:, None] - config.local_blocks)
        forced = forced[None] & valid
        if windowed:
            seen = rows[:, :, :used].reshape(batch, q_len, tree.num_blocks, block).sum(-1)  # row's keys per block
            valid = valid & (seen > 0)
            part_seen = valid & (seen < count[:, None])
            forced = (forced & valid) | part_seen
        # every forced block fits the width; a budget that covers the row's keys takes every block (exact)
        available = valid.sum(-1)
        wanted = torch.maximum(torch.minimum(wanted, available), forced.sum(-1))
        wanted = torch.where(budgets >= visible, available, wanted)
        bound = _scores(torch.cat([query.clamp(min=0), -query.clamp(max=0)], -1), level["kbox"])
        bound = _reduce_heads(bound, sharing, "max")
        bound = torch.where(forced[:, None, None], torch.finfo(bound.dtype).max, bound)
        bound = bound.masked_fill(~valid[:, None, None], float("-inf"))
        width = int(wanted.max())
        top, kept = bound.topk(min(width, bound.shape[-1]), dim=-1)
        kept_ok = (torch.arange(top.shape[-1], device=device) < wanted[:, None, None, :, None]) & torch.isfinite(top)
        selected = torch.zeros_like(bound, dtype=torch.bool).scatter_(-1, kept, kept_ok)
        if q_len > GATHER_ROWS:
            # prefill: every row's selected blocks as a mask over one score matrix (the same terms as the
            # gather below, cheaper when many rows share the keys)
            mask = selected.repeat_interleave(block, -1) & rows[:, None, None, :, :used]
            softmax.add(_scores(scaled, key[:, :, :used]).masked_fill(~mask, float("-inf")), value[:, :, :used])
            exact += float(mask.sum()) / heads
        else:
            exact += _gather_blocks(key, value, rows, kept, kept_ok, block, tree.num_blocks, scaled, softmax, heads)
        if config.estimate == "mean":
            rest = valid[:, None, None] & ~selected
            if windowed:
                rest = rest & ~part_seen[:, None, None]
            counts = count.clamp(min=1)[:, None, None, None]  # (B, 1, 1, 1, N)
            logits = _scores(scaled, level["ksum"]) / counts  # q . mean key
            softmax.add(logits.masked_fill(~rest, float("-inf")), level["vsum"], counts)
            rest_terms = float(rest.sum()) / heads
    exact += _local_block(key, value, rows, positions, blocks, block, scaled, softmax)
    config.stats.add(q_len * batch, float(visible.sum()), exact, exact + rest_terms)
    return softmax.result()


def _gather_blocks(key, value, rows, kept, kept_ok, block, num_blocks, scaled, softmax, heads) -> float:
    """Decode: gather the kept blocks (one contiguous block * D row per index, not single keys); `rows` (B, Q, kv)
    masks each row's keys (padding, window)."""
    batch, kv_heads, dim = key.shape[0], key.shape[1], key.shape[-1]
    device = key.device
    used = num_blocks * block
    block_keys = _gather(key[:, :, :used].reshape(batch, kv_heads, num_blocks, block * dim), kept)
    block_values = _gather(value[:, :, :used].reshape(batch, kv_heads, num_blocks, -1), kept)
    key_positions = (kept[..., None] * block + torch.arange(block, device=device)).flatten(-2)  # (B, Hs, S, Q, W*b)
    row_visible = rows[:, None, None].expand(*key_positions.shape[:4], rows.shape[-1]).gather(-1, key_positions)
    valid_keys = kept_ok[..., None].expand(*kept_ok.shape, block).flatten(-2) & row_visible
    block_keys = block_keys.view(batch, kv_heads, *kept.shape[2:], block, dim).flatten(-3, -2)
    block_values = block_values.view(batch, kv_heads, *kept.shape[2:], block, -1).flatten(-3, -2)
    softmax.add(_dot(scaled, block_keys).masked_fill(~valid_keys, float("-inf")), block_values)
    return float(valid_keys.sum()) / heads


def _bound_rows(config, tree: KeyTree, key, value, key_valid, query, positions, rows, budgets, visible, scaling):
    """Hierarchical top-W descent on the min/max bound; exact on kept leaves, estimated on the rest."""
    batch, kv_heads, n_rep, q_len, dim = query.shape
    block, device = tree.block, query.device
    sharing = config.sharing
    sel_heads = kv_heads if sharing != "all" else 1
    sel_rep = n_rep if sharing == "per_head" else 1
    blocks = ((positions + 1) // block).clamp(max=tree.num_blocks)  # complete visible blocks per row (Q,)
    partial = positions + 1 - blocks * block
    wanted = torch.round((budgets - partial[None]).clamp(min=0).double() / block).long()
    wanted = torch.minimum(wanted.clamp(min=1), blocks[None].expand_as(wanted))  # (B, Q)
    width = int(wanted.max()) if blocks.numel() else 0
    softmax = _Softmax()
    positive, negative = query.clamp(min=0) * scaling, query.clamp(max=0) * scaling
    scaled = query * scaling
    shape = (batch, sel_heads, sel_rep, q_len)
    exact_blocks = torch.zeros(batch, sel_heads, sel_rep, q_len, device=device)
    frontier_terms = torch.zeros_like(exact_blocks)
    if width > 0:
        top = int(blocks.max()).bit_length() - 1
        kept = torch.zeros(*shape, 0, dtype=torch.long, device=device)
        kept_ok = torch.zeros(*shape, 0, dtype=torch.bool, device=device)
        counts, kmin, kmax = tree.buffers["count"], tree.buffers["kmin"], tree.buffers["kmax"]
        for level in range(top, -1, -1):
            root, has_root = prefix_roots(blocks, level)
            offset = tree.offset(level)
            candidates = torch.cat([2 * kept, 2 * kept + 1, root.view(1, 1, 1, q_len, 1).expand(*shape, 1)], -1)
            ok = torch.cat([kept_ok, kept_ok, has_root.view(1, 1, 1, q_len, 1).expand(*shape, 1)], -1)
            ids = candidates + offset
            ok = ok & (_gather_count(counts, ids.flatten(1)).view(ids.shape) > 0)
            bound = _dot(positive, _gather(kmax, ids)) + _dot(negative, _gather(kmin, ids))
            bound = _reduce_heads(bound, sharing, "max").masked_fill(~ok, float("-inf"))
            keep = wanted if level == 0 else (wanted.double() * config.beam).ceil().long()
            limit = width if level == 0 else int(math.ceil(width * config.beam))
            values, order = bound.topk(min(limit, bound.shape[-1]), dim=-1)
            chosen = (torch.arange(values.shape[-1], device=device) < keep[:, None, None, :, None]) & torch.isfinite(values)
            kept, kept_ok = candidates.gather(-1, order), chosen
            dropped = ok & ~torch.zeros_like(ok).scatter(-1, order, chosen)
            if config.estimate == "mean" and bool(dropped.any()):
                count = _gather_count(counts, ids.flatten(1)).view(ids.shape).clamp(min=1)
                mean_key = _gather(tree.buffers["ksum"], ids) / count[..., None]
                vmean = _gather(tree.buffers["vsum"], ids) / count[..., None]
                logits = _dot(scaled, mean_key) + torch.log(count)
                logits = logits.masked_fill(~dropped, float("-inf"))
                softmax.add(logits, vmean)
                frontier_terms += dropped.sum(-1)
        # exact scores on the kept leaf blocks
        exact_blocks = kept_ok.sum(-1).float()
        offsets = torch.arange(block, device=device)
        key_positions = (kept[..., None] * block + offsets).flatten(-2)  # (B, Hs, S, Q, W*block)
        valid = kept_ok[..., None].expand(*kept_ok.shape, block).flatten(-2)
        if key_valid is not None:
            valid = valid & key_valid.gather(1, key_positions.flatten(1)).view(key_positions.shape)
        softmax.add(_dot(scaled, _gather(key, key_positions)).masked_fill(~valid, float("-inf")),
                    _gather(value, key_positions))
    # the row's own partial block, exact
    local = (blocks * block)[:, None] + torch.arange(block, device=device)  # (Q, block)
    local_ok = (local <= positions[:, None]) & (local < key.shape[2])
    local = local.clamp(max=key.shape[2] - 1)
    local_ok = local_ok[None].expand(batch, q_len, block) & rows.gather(2, local[None].expand(batch, -1, -1))
    local_keys = key[:, :, local.reshape(-1)].view(batch, kv_heads, 1, q_len, block, dim)
    local_values = value[:, :, local.reshape(-1)].view(batch, kv_heads, 1, q_len, block, value.shape[-1])
    softmax.add(_dot(scaled, local_keys).masked_fill(~local_ok[:, None, None], float("-inf")), local_values)
    heads = sel_heads * sel_rep
    exact = float(exact_blocks.sum()) * block / heads + float(local_ok.sum())
    config.stats.add(q_len * batch, float(visible.sum()), exact, exact + float(frontier_terms.sum()) / heads)
    return softmax.result()


# ------------------------------------------------------------------------------------------------ seed methods
def _leaf_log_weight(config, tree, method, query, scaling, stats, level, index, visible_len):
    """log of the per-leaf weight estimate of exp(q.k * scaling) for buds (per head): (B, Hkv, R, Q, C)."""
    count = stats["count"]
    if method in ("alignment", "favor+relu", "time-decay", "uniform"):
        return _dot(query * scaling, stats["ksum"]) / count
    features = random_features(FEATURE_METHODS[method], query.shape[-1], config.num_features, config.seed)
    phi = feature_map(query * math.sqrt(scaling), features)  # (B, Hkv, R, Q, F)
    inner = _dot(phi, stats["feat"]).float()
    if method == "positive_alignment":
        return inner / count
    # The feature sums overflow at large key norms (exp(|k|^2/2) per key: inf, or inf - inf = nan for RFF's signed
    # features) and RFF estimates can be <= 0. Keep every estimate a finite positive number: an overflow counts
    # as the largest weight, a non-positive or undefined estimate as (almost) no mass, so no row's softmax
    # turns into inf - inf.
    finfo = torch.finfo(inner.dtype)
    return torch.log(inner.nan_to_num(nan=0.0, posinf=finfo.max).clamp(min=finfo.tiny) / count)


def _sampling_log_mass(config, method, query, scaling, stats, level, index, visible_len):
    """The seed's mass per bud (log): alignment family per-leaf estimate, time-decay sum of b^age, uniform 1."""
    count = stats["count"]
    if method == "uniform":
        return torch.zeros_like(count).expand(query.shape[0], query.shape[1], query.shape[2], *count.shape[3:])
    if method == "time-decay":
        size = (1 << level).double()
        end = (index.double() + 1) * size - 1
        base = math.log(config.decay)
        log_mass = (visible_len[:, None, None, :, None].double() - 1 - end) * base + torch.log(
            (1 - config.decay ** size) / (1 - config.decay))
        return log_mass.float().expand(query.shape[0], query.shape[1], query.shape[2], *count.shape[3:])
    if method == "favor+relu":
        features = random_features("favor+relu", query.shape[-1], config.num_features, config.seed)
        phi = feature_map(query * math.sqrt(scaling), features)
        return torch.log(_dot(phi, stats["feat"]).float().clamp(min=0) / count)
    return _leaf_log_weight(config, None, method, query, scaling, stats, level, index, visible_len)


def _bud_stats(tree: KeyTree, level, index, names, kv_heads):
    ids = index + torch.tensor([tree.offset(l) for l in range(tree.num_levels)], device=index.device)[level]
    out = {name: _gather(tree.buffers[name], ids) for name in names}
    count = _gather_count(tree.buffers["count"], ids.flatten(1)).view(ids.shape)
    out["count_raw"] = count
    out["count"] = count.clamp(min=1)
    return out


def _seed_rows(config, tree: KeyTree, key, value, key_valid, query, positions, rows, budgets, visible, scaling,
               layer: int | None):
    """The seed's sampled descent (vectorised over rows and heads; one Python iteration per P expansions)."""
    batch, kv_heads, n_rep, q_len, dim = query.shape
    device, method, sharing = query.device, config.method, config.sharing
    sel_heads = kv_heads if sharing != "all" else 1
    sel_rep = n_rep if sharing == "per_head" else 1
    shape = (batch, sel_heads, sel_rep, q_len)
    leaves = (positions + 1).clamp(max=tree.num_blocks)  # single-key leaves: the row's own key included
    top = int(leaves.max()).bit_length() - 1
    levels = torch.arange(top, -1, -1, device=device)
    shifted = leaves[:, None] >> levels  # (Q, L)
    root_ok = (shifted & 1).bool()
    roots = (shifted - 1).clamp(min=0)
    parallel = config.parallel_buds()
    n_roots = levels.numel()
    capacity = int(budgets.max()) + n_roots + parallel + 1
    bud_level = torch.zeros(*shape, capacity, dtype=torch.long, device=device)
    bud_index = torch.zeros_like(bud_level)
    bud_ok = torch.zeros(*shape, capacity, dtype=torch.bool, device=device)
    bud_level[..., :n_roots] = levels
    bud_index[..., :n_roots] = roots
    bud_ok[..., :n_roots] = root_ok
    feat_names = ("ksum", "feat") if method in FEATURE_METHODS else ("ksum",)
    mass_names = ("feat",) if method in FEATURE_METHODS else (("ksum",) if method == "alignment" else ())

    def log_mass(level, index):
        stats = _bud_stats(tree, level, index, mass_names, kv_heads)
        per_head = _sampling_log_mass(config, method, query, scaling, stats, level, index, visible)
        per_head = per_head.masked_fill(~torch.isfinite(per_head), float("-inf"))
        return _reduce_heads(per_head, sharing, "logsumexp"), stats["count_raw"] > 0

    mass = torch.full((*shape, capacity), float("-inf"), device=device)
    root_mass, root_nonempty = log_mass(bud_level[..., :n_roots], bud_index[..., :n_roots])
    mass[..., :n_roots] = root_mass
    bud_ok[..., :n_roots] &= root_nonempty
    count = bud_ok.sum(-1)
    next_slot = torch.full_like(count, n_roots)
    target = budgets.view(batch, 1, 1, q_len)
    generator = torch.Generator(device="cpu").manual_seed(config.seed * 1000 + (layer or 0))
    trash = capacity - 1
    while True:
        room = (target - count).clamp(min=0, max=parallel)
        expandable = bud_ok & (bud_level > 0)
        if not bool(((room > 0) & expandable.any(-1)).any()):
            break
        gumbel = -torch.log(-torch.log(torch.rand(mass.shape, generator=generator).clamp(1e-20, 1.0 - 1e-7)))
        keys = torch.where(expandable, torch.nan_to_num(mass, neginf=-1e30) + gumbel.to(device), float("-inf"))
        values, pick = keys.topk(parallel, dim=-1)
        chosen = (torch.arange(parallel, device=device) < room[..., None]) & torch.isfinite(values)
        parent_level, parent_index = bud_level.gather(-1, pick), bud_index.gather(-1, pick)
        # Unchosen picks may point at slots holding no complete node (their children need not exist in the
        # tree's buffers): send them to leaf 0, their results land in the trash slot anyway.
        child_level = torch.where(chosen, parent_level - 1, 0)
        left = torch.where(chosen, 2 * parent_index, 0)
        right = torch.where(chosen, 2 * parent_index + 1, 0)
        left_mass, left_ok = log_mass(child_level, left)
        right_mass, right_ok = log_mass(child_level, right)
        slot_left = torch.where(chosen, pick, trash)
        slot_right = torch.where(chosen, next_slot[..., None] + chosen.long().cumsum(-1) - 1, trash)
        for slots, index, bud_mass, nonempty in ((slot_left, left, left_mass, left_ok),
                                                 (slot_right, right, right_mass, right_ok)):
            bud_level.scatter_(-1, slots, child_level)
            bud_index.scatter_(-1, slots, index)
            mass.scatter_(-1, slots, bud_mass)
            bud_ok.scatter_(-1, slots, nonempty)
        bud_ok[..., trash] = False
        count = bud_ok.sum(-1)  # an all-padding child is dropped and does not use the budget
        next_slot = next_slot + chosen.sum(-1)
    # output: exact weight on single-key buds, the method's estimate of exp(score) per leaf elsewhere
    stats = _bud_stats(tree, bud_level, bud_index, feat_names + ("vsum",), kv_heads)
    # a bud holding one valid key is exact: a leaf, or (left padding) a node whose other keys are all padding;
    # ksum is then that key (padding is masked out of the sums), whatever the feature estimate would say
    single = stats["count_raw"] == 1
    exact = _dot(query * scaling, stats["ksum"])
    estimate_method = method if method in EXP_SCALE_METHODS else "alignment"
    estimate = _leaf_log_weight(config, tree, estimate_method, query, scaling, stats, bud_level, bud_index, visible)
    count = stats["count"]
    logits = torch.where(single, exact, estimate) + torch.log(count)
    logits = logits.masked_fill(~bud_ok, float("-inf")).masked_fill(torch.isnan(logits), float("-inf"))
    vsum_count = stats["count"][..., None]
    softmax = _Softmax()
    softmax.add(logits, stats["vsum"] / vsum_count)
    leaves_used = (bud_ok & single).sum(-1).float()
    heads = sel_heads * sel_rep
    config.stats.add(q_len * batch, float(visible.sum()), float(leaves_used.sum()) / heads,
                     float(bud_ok.sum()) / heads)
    return softmax.result()


# -------------------------------------------------------------------------------------------- model plumbing
tree_kernel_sdpa = masked(tree_kernel_attention)


def register() -> None:
    register_attention(NAME, tree_kernel_sdpa, mask="sdpa")


def configure_tree_kernel(model: nn.Module, config: TreeKernelConfig | None) -> TreeKernelConfig | None:
    """Attach `config` to the attention modules of `model` and switch it to `sa_tree_kernel`.

    `None` removes the configuration (the model stays on `sa_tree_kernel`, which is then exact SDPA). Head masks
    set with `mask_heads` keep working (the function is wrapped by `masked`).
    """
    from ..masking import attention_modules, check_attention_interface, text_config

    check_attention_interface(model)
    modules = attention_modules(model)
    text = text_config(model)
    if config is not None:
        missing = sorted(set(config.layers or ()) - set(modules))
        if missing:
            raise ValueError(f"tree-kernel layers {missing} do not exist (model has {len(modules)} layers)")
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        if config.method in FEATURE_METHODS and config.num_features is not None and config.num_features < 1:
            raise ValueError("num_features must be >= 1")
        prefix_walk = config.method in SEED_METHODS or (config.method == "bound" and config.descent == "tree")
        if prefix_walk and getattr(text, "attn_logit_softcapping", None):
            raise ValueError(f"tree-kernel method {config.method!r} (descent {config.descent!r}) does not support "
                             "attention logit soft-capping: use dense, topk or bound with descent='flat'")
        sliding = sorted(sliding_window_layers(model.config) & set(config.layers or modules))
        if sliding and prefix_walk:
            raise ValueError(f"tree-kernel method {config.method!r} (descent {config.descent!r}) walks causal "
                             f"prefixes and cannot honour the sliding window of layers {sliding}: use dense, topk or "
                             "bound with descent='flat', or choose full-attention layers with `layers`")
        logger.info("tree kernel %s on %s layers (head dim %d)", config.method,
                    "all" if config.layers is None else len(config.layers), head_dim)
    for layer_modules in modules.values():
        for module in layer_modules:
            setattr(module, CONFIG_ATTRIBUTE, config)
            setattr(module, TREE_ATTRIBUTE, {})
    setattr(text, CONFIG_KEY, config.to_dict() if config is not None else None)
    if config is not None and model.config._attn_implementation != NAME:
        model.set_attn_implementation(NAME)
    return config

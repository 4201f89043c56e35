"""A binary tree of key summaries over the KV cache, grown incrementally as keys are appended.

Level 0 holds one node per *complete* leaf block of `block` consecutive key positions; level l holds node j
covering blocks [j 2^l, (j+1) 2^l). Only complete nodes are stored, so a node never changes once written:
appending keys writes the new leaf blocks and, above them, only the O(log n) ancestors that became complete.
A query at position p uses the complete nodes of its own causal prefix (see `prefix_roots`), so one tree
serves every row of a prefill.

Each node keeps what a selection method needs (only the stats requested are built):
- ``count``: valid (non-padding) keys below the node;
- ``ksum``, ``vsum``: sums of keys and values (node representative = mean value, mean key);
- ``kmin``, ``kmax``: element-wise min/max of keys (upper bound of q.k for every key below);
- ``kbox``: [kmax, -kmin] in one row (2D), so the bound is a single product [q+, -q-] . kbox;
- ``feat``: sum of phi(k) for a feature map (float64).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


def _combine(stat: str, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    if stat == "kmin":
        return torch.minimum(left, right)
    if stat in ("kmax", "kbox"):
        return torch.maximum(left, right)
    return left + right


@dataclass
class KeyTree:
    """Per-level node statistics of a (B, H, length, D) key cache; see module docstring.

    All levels of a stat live in one buffer (B, H, 2 * capacity, X) (count: (B, 2 * capacity)): level l starts at
    `offset(l)` and has room for capacity >> l nodes, so a node anywhere in the tree has one global id and a single
    gather serves buds of mixed levels. The buffer doubles (amortised O(1) per key) when the cache outgrows it.
    """

    block: int
    stats: tuple[str, ...]
    feature_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
    length: int = 0  # key positions covered
    capacity: int = 0  # leaf nodes the buffers have room for (a power of two)
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    sizes: list[int] = field(default_factory=list)  # complete nodes per level
    _first: torch.Tensor | None = None
    _last: torch.Tensor | None = None

    @property
    def num_levels(self) -> int:
        return len(self.sizes)

    @property
    def num_blocks(self) -> int:
        return self.sizes[0] if self.sizes else 0

    def offset(self, level: int) -> int:
        return 2 * self.capacity - 2 * (self.capacity >> level)

    def level(self, index: int) -> dict[str, torch.Tensor]:
        """Views of level `index`'s complete nodes: stat -> (B, H, N, X), count -> (B, N)."""
        lo, hi = self.offset(index), self.offset(index) + self.sizes[index]
        return {name: (t[:, lo:hi] if name == "count" else t[:, :, lo:hi]) for name, t in self.buffers.items()}

    def matches(self, key: torch.Tensor, q_len: int) -> bool:
        """True when `key` extends (or repeats) the keys this tree was built from, so an append suffices.

        A fresh prefill (no past keys) always rebuilds. Otherwise the cache must hold at least the covered keys
        and agree with the tree's first and last covered key (cheap fingerprint of "same sequence").
        """
        length = key.shape[2]
        if self._first is None or length == q_len or length < self.length or self.length == 0:
            return False
        if key.shape[:2] != self._first.shape[:2] or key.shape[-1] != self._first.shape[-1]:
            return False
        return bool(torch.equal(key[:, :, 0], self._first) and torch.equal(key[:, :, self.length - 1], self._last))

    def update(self, key: torch.Tensor, value: torch.Tensor, key_valid: torch.Tensor | None, q_len: int) -> "KeyTree":
        """Bring the tree up to date with `key`/`value` (B, H, L, D): append when possible, else rebuild."""
        extends = self.matches(key, q_len)
        if not extends:
            self.length, self.capacity, self.buffers, self.sizes = 0, 0, {}, []
            self._first = key[:, :, 0].clone()  # the same sequence keeps its first key
        self._append(key, value, key_valid)
        self.length = key.shape[2]
        self._last = key[:, :, -1].clone()
        return self

    def _leaf_stats(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
        """Stats of new complete blocks: keys (B, H, n, block, D), valid (B, n, block)."""
        mask = valid[:, None, :, :, None]
        out: dict[str, torch.Tensor] = {"count": valid.sum(-1).to(torch.float32)}
        for stat in self.stats:
            if stat == "ksum":
                out[stat] = (keys * mask).sum(3)
            elif stat == "vsum":
                out[stat] = (values * mask).sum(3)
            elif stat == "kmin":
                out[stat] = keys.masked_fill(~mask, float("inf")).amin(3)
            elif stat == "kmax":
                out[stat] = keys.masked_fill(~mask, float("-inf")).amax(3)
            elif stat == "kbox":
                out[stat] = torch.cat([keys.masked_fill(~mask, float("-inf")).amax(3),
                                       (-keys).masked_fill(~mask, float("-inf")).amax(3)], dim=-1)
            elif stat == "feat":
                out[stat] = (self.feature_fn(keys) * mask).sum(3)
        return out

    def _grow(self, blocks: int, like: dict[str, torch.Tensor]) -> None:
        capacity = 1 << max(2, (2 * blocks - 1).bit_length())
        grown = {}
        for name, tensor in like.items():
            shape = list(tensor.shape)
            node_dim = 1 if name == "count" else 2
            shape[node_dim] = 2 * capacity
            grown[name] = tensor.new_zeros(shape)
        old_capacity, self.capacity = self.capacity, capacity
        for level, size in enumerate(self.sizes):
            for name, buffer in self.buffers.items():
                node_dim = 1 if name == "count" else 2
                source = 2 * old_capacity - 2 * (old_capacity >> level)
                grown[name].narrow(node_dim, self.offset(level), size).copy_(buffer.narrow(node_dim, source, size))
        self.buffers = grown

    def _store(self, level: int, new: dict[str, torch.Tensor]) -> None:
        if level == len(self.sizes):
            self.sizes.append(0)
        size, added = self.sizes[level], new["count"].shape[1]
        for name, tensor in new.items():
            node_dim = 1 if name == "count" else 2
            self.buffers[name].narrow(node_dim, self.offset(level) + size, added).copy_(tensor)
        self.sizes[level] = size + added

    def _append(self, key: torch.Tensor, value: torch.Tensor, key_valid: torch.Tensor | None) -> None:
        batch, heads, length, dim = key.shape
        old_blocks = self.num_blocks
        new_blocks = length // self.block
        if new_blocks <= old_blocks:
            return
        start, stop = old_blocks * self.block, new_blocks * self.block
        count = new_blocks - old_blocks
        keys = key[:, :, start:stop].float().reshape(batch, heads, count, self.block, dim)
        values = value[:, :, start:stop].float().reshape(batch, heads, count, self.block, value.shape[-1])
        if key_valid is None:
            valid = torch.ones(batch, count, self.block, dtype=torch.bool, device=key.device)
        else:
            valid = key_valid[:, start:stop].reshape(batch, count, self.block)
        leaves = self._leaf_stats(keys, values, valid)
        if new_blocks > self.capacity:
            self._grow(new_blocks, leaves)
        self._store(0, leaves)
        level = 1
        while (new_blocks >> level) > 0:
            lo, hi = old_blocks >> level, new_blocks >> level
            if hi > lo:
                below = self.level(level - 1)
                new = {}
                for name, tensor in below.items():
                    node_dim = 1 if name == "count" else 2
                    pairs = tensor.narrow(node_dim, 2 * lo, 2 * (hi - lo)).unflatten(node_dim, (hi - lo, 2))
                    new[name] = _combine(name, pairs.select(node_dim + 1, 0), pairs.select(node_dim + 1, 1))
                self._store(level, new)
            level += 1


def prefix_roots(visible_blocks: torch.Tensor, level: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The node of `level` in the binary decomposition of each prefix [0, m) of complete blocks.

    [0, m) is the disjoint union, over the set bits l of m, of node (m >> l) - 1 at level l (a Fenwick split),
    so every query row starts from at most log2(m) + 1 complete nodes of its own past. Returns (index, exists).
    """
    shifted = visible_blocks >> level
    exists = (shifted & 1).bool()
    return (shifted - 1).clamp(min=0), exists

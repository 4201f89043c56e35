"""Which KV heads to merge: groupings scored from Gram matrices of their key/value activations.

A grouping (partition) of the source KV heads into merged heads costs, per Gram matrix G (KV head x KV head, over
calibration tokens) and weights w (query heads per KV head), the weighted squared deviation of each head from its
cluster's weighted mean: the reconstruction error of mean-merging, computed without touching the activations.
"""

from __future__ import annotations

import itertools

import torch

MAX_ENUMERATED_GROUPINGS = 20000


def partition_cost(gram: torch.Tensor, weights: torch.Tensor, partition: list[list[int]]) -> float:
    """Sum over clusters of weighted squared deviation from the weighted cluster mean, from the Gram matrix."""
    total = 0.0
    for cluster in partition:
        index = torch.tensor(cluster)
        w = weights[index]
        block = gram[index][:, index]
        total += float((w * block.diagonal()).sum() - (w[:, None] * w[None, :] * block).sum() / w.sum())
    return total


def set_partitions(items: list[int], clusters: int):
    """Every partition of `items` into exactly `clusters` non-empty blocks (Stirling numbers of the 2nd kind)."""
    if clusters == 0:
        if not items:
            yield []
        return
    if len(items) < clusters:
        return
    first, rest = items[0], items[1:]
    for partition in set_partitions(rest, clusters - 1):  # `first` alone
        yield [[first], *partition]
    for partition in set_partitions(rest, clusters):  # `first` joins a block
        for index in range(len(partition)):
            yield [*partition[:index], [first, *partition[index]], *partition[index + 1:]]


def stirling(items: int, clusters: int) -> int:
    table = [[0] * (clusters + 1) for _ in range(items + 1)]
    table[0][0] = 1
    for n in range(1, items + 1):
        for k in range(1, clusters + 1):
            table[n][k] = k * table[n - 1][k] + table[n - 1][k - 1]
    return table[items][clusters]


def contiguous_partition(items: int, clusters: int) -> list[list[int]]:
    """Mean pooling's grouping: consecutive KV heads, sizes as equal as possible (equal when divisible)."""
    size, extra = divmod(items, clusters)
    partition, start = [], 0
    for index in range(clusters):
        length = size + (1 if index < extra else 0)
        partition.append(list(range(start, start + length)))
        start += length
    return partition


def best_partition(gram: torch.Tensor, weights: torch.Tensor, clusters: int) -> list[list[int]]:
    """Grouping of KV heads into `clusters` merged heads with the least reconstruction cost.

    Exhaustive when there are at most MAX_ENUMERATED_GROUPINGS groupings, else local search (move or swap one
    head at a time) starting from the contiguous grouping; either way never worse than contiguous.
    """
    items = gram.shape[0]
    contiguous = contiguous_partition(items, clusters)
    if stirling(items, clusters) <= MAX_ENUMERATED_GROUPINGS:
        candidates = itertools.chain([contiguous], set_partitions(list(range(items)), clusters))
        return min(candidates, key=lambda p: partition_cost(gram, weights, p))
    best, best_cost = [list(c) for c in contiguous], partition_cost(gram, weights, contiguous)
    improved = True
    while improved:
        improved = False
        for a, b in itertools.permutations(range(clusters), 2):
            for i in range(len(best[a])):
                trials = []
                if len(best[a]) > 1:  # move head i of cluster a into cluster b
                    trial = [list(c) for c in best]
                    trial[b].append(trial[a].pop(i))
                    trials.append(trial)
                for j in range(len(best[b])):  # swap it with head j of cluster b
                    trial = [list(c) for c in best]
                    trial[a][i], trial[b][j] = trial[b][j], trial[a][i]
                    trials.append(trial)
                for trial in trials:
                    cost = partition_cost(gram, weights, trial)
                    if cost < best_cost - 1e-12:
                        best, best_cost, improved = trial, cost, True
                        break
                if improved:
                    break
            if improved:
                break
    return best


def canonical(partition: list[list[int]]) -> list[list[int]]:
    return sorted((sorted(cluster) for cluster in partition), key=lambda cluster: cluster[0])


def relative_error(grams: tuple, weights: torch.Tensor, partition: list[list[int]]) -> float:
    total = 0.0
    for gram in grams:
        norm = float((weights * gram.diagonal()).sum())
        total += partition_cost(gram, weights, partition) / max(norm, 1e-30)
    return max(total / len(grams), 0.0)

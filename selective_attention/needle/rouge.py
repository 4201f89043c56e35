"""ROUGE-1 recall with Google's `rouge-score` (as the Retrieval_Head reference scores answers)."""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)


def rouge1_recall(target: str, prediction: str) -> float:
    """Share of `target`'s unigrams (stemmed) found in `prediction`, in [0, 1]."""
    return float(_scorer().score(target, prediction)["rouge1"].recall)

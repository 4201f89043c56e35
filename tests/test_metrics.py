"""The needle score as an `evaluate` metric: loads offline from its local file, scores as the needle grid does."""

from __future__ import annotations

import evaluate
import pytest

from selective_attention.retrieval.languages import get_language
from selective_attention.metrics import NEEDLE_ROUGE_PATH
from selective_attention.retrieval.needles import resolve_needles


@pytest.fixture(scope="module")
def metric(tmp_path_factory):
    return evaluate.load(NEEDLE_ROUGE_PATH, cache_dir=str(tmp_path_factory.mktemp("evaluate")))


def test_needle_rouge_equals_the_grid_scoring(metric):
    needle = resolve_needles("sf")[0].needle
    answers = ["The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.",
               "I do not know.", needle.upper()]
    result = metric.compute(predictions=answers, references=[needle] * 3, language="en")
    expected = [round(100 * get_language("en").rouge1_recall(needle, answer), 2) for answer in answers]
    assert result["scores"] == expected
    assert result["scores"][0] > 50 > result["scores"][1] and result["scores"][2] == 100
    assert result["score"] == pytest.approx(sum(expected) / 3)


def test_needle_rouge_segments_chinese(metric):
    needle = "在旧金山最好的事情是吃一个三明治。"
    result = metric.compute(predictions=["最好的事情是吃一个三明治"], references=[needle], language="zh")
    assert result["scores"] == [round(100 * get_language("zh").rouge1_recall(needle, "最好的事情是吃一个三明治"), 2)]
    assert result["scores"][0] > 50  # rouge-score's default tokenizer would drop every Chinese character


def test_needle_rouge_refuses_unknown_language(metric):
    with pytest.raises(ValueError, match="unknown language"):
        metric.compute(predictions=["a"], references=["a"], language="xx")

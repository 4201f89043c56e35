"""The needle score as an `evaluate` metric, for scoring needle-in-a-haystack answers in any pipeline.

ROUGE-1 recall x 100 of the target (the needle sentence, or the expected answer) in each prediction, tokenized the
way the needle test's language needs (stemmed English as the Retrieval_Head reference scores it, jieba for Chinese,
Unicode words for German; see `selective_attention.retrieval.languages`). It is the same function the `needle` and `detect`
commands score with. The module is a local file, so it loads offline:

    import evaluate
    from selective_attention.metrics import NEEDLE_ROUGE_PATH
    metric = evaluate.load(NEEDLE_ROUGE_PATH)
    metric.compute(predictions=["The best thing ... is to eat a sandwich"], references=[needle], language="en")
"""

import datasets
import evaluate

from selective_attention.retrieval.languages import get_language, supported_languages

_DESCRIPTION = "ROUGE-1 recall x 100 of the needle in each answer, tokenized per language."
_INPUTS = """
Args:
    predictions: the model's answers (strings).
    references: the needle sentences or expected answers (strings), one per prediction.
    language: language code of the needles (one of selective_attention.retrieval.languages.supported_languages()).
Returns:
    score: mean over the pairs; scores: one per pair.
"""


class NeedleRouge(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Wu et al. 2024, Retrieval Head Mechanistically Explains Long-Context Factuality",
            inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions: list[str], references: list[str], language: str = "en") -> dict:
        if language not in supported_languages():
            raise ValueError(f"unknown language {language!r}; expected one of {supported_languages()}")
        recall = get_language(language).rouge1_recall
        scores = [round(100 * recall(reference, prediction), 2) for prediction, reference in zip(predictions, references)]
        return {"score": sum(scores) / len(scores) if scores else float("nan"), "scores": scores}

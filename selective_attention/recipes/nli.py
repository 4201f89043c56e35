"""Natural language inference (MNLI) for the recipes: examples, label-word parsing, prompts and metrics.

Loading examples (files, the hub, seeded subsets) is `nli_data`. Metrics are computed locally (`evaluate.load`
would need the network).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

#: MNLI's label ids, in order: 0 entailment, 1 neutral, 2 contradiction.
LABELS: tuple[str, ...] = ("entailment", "neutral", "contradiction")
FIELDS: tuple[str, ...] = ("premise", "hypothesis", "label")
#: Class index used for an answer that names no label (or several conflicting ones).
INVALID = -1

INSTRUCTION = (
    "Read the premise and the hypothesis. Does the premise entail the hypothesis, contradict it, or neither?\n\n"
    "Premise: {premise}\nHypothesis: {hypothesis}\n\n"
    "Options: entailment, neutral, contradiction.\nAnswer with one word."
)
CLASSIFICATION_TEMPLATE = "Premise: {premise}\nHypothesis: {hypothesis}"


@dataclass(frozen=True)
class NLIExample:
    premise: str
    hypothesis: str
    label: int
    id: str = ""

    @property
    def label_name(self) -> str:
        return LABELS[self.label]


# --- labels ------------------------------------------------------------------------------------------------------


def label_id(value: object, *, where: str = "") -> int:
    """0/1/2 or a label name (any case) -> label id; anything else is a ValueError naming the value."""
    if isinstance(value, bool):
        raise ValueError(f"unknown label {value!r}{where}; expected one of {', '.join(LABELS)} or 0/1/2")
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        number = int(value)
        if 0 <= number < len(LABELS):
            return number
    elif isinstance(value, str) and value.strip().lower() in LABELS:
        return LABELS.index(value.strip().lower())
    raise ValueError(f"unknown label {value!r}{where}; expected one of {', '.join(LABELS)} or 0/1/2")


_LABEL_WORD = re.compile(r"\b(entail\w*|neutral\w*|contradict\w*)", re.IGNORECASE)
_NEGATION = re.compile(r"(?:\bnot|\bnever|\bneither|\bnor|\bno|n't)\s+(?:(?:a|an|the|really|necessarily|clearly)\s+)?$",
                       re.IGNORECASE)
_ANSWER_MARKER = re.compile(r"\b(?:answer|label|prediction)\s*(?:is|:)\s*", re.IGNORECASE)
_SPECIAL = re.compile(r"<\|[^|>]*\|>|</?s>|\[/?INST\]")


def parse_label(text: str) -> int:
    """The label a generated answer names, or `INVALID`.

    The first label word that is not directly negated wins ("Contradiction. The premise does not entail..." ->
    contradiction); after an answer marker ("Answer: ...", "the answer is ...") only the text after the last
    marker counts, so an echo of the options does not win; inflections count ("entails", "contradicts",
    "neutrality"); markup, quotes and special tokens are ignored. "not entailment" alone, an empty answer or an
    answer naming no label is `INVALID`.
    """
    cleaned = _SPECIAL.sub(" ", text or "")
    markers = list(_ANSWER_MARKER.finditer(cleaned))
    if markers:  # "Options: entailment, neutral, contradiction. Answer: neutral" -> read after the last marker
        tail = cleaned[markers[-1].end():]
        if _LABEL_WORD.search(tail):
            cleaned = tail
    for match in _LABEL_WORD.finditer(cleaned):
        if _NEGATION.search(cleaned[: match.start()]):
            continue
        word = match.group(1).lower()
        return 0 if word.startswith("entail") else 1 if word.startswith("neutral") else 2
    return INVALID

# --- prompts -----------------------------------------------------------------------------------------------------


def user_message(example: NLIExample) -> str:
    return INSTRUCTION.format(premise=example.premise, hypothesis=example.hypothesis)


def generation_prompt(tokenizer, example: NLIExample) -> str:
    """The chat prompt up to where the assistant answers (plain text when the tokenizer has no chat template)."""
    message = user_message(example)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                             add_generation_prompt=True)
    return f"{message}\nAnswer:"


def answer_text(tokenizer, example: NLIExample) -> str:
    """The target: the label word, then the tokenizer's end-of-turn token so the model learns to stop."""
    prefix = "" if getattr(tokenizer, "chat_template", None) else " "
    return f"{prefix}{example.label_name}{tokenizer.eos_token or ''}"


def generative_features(tokenizer, example: NLIExample, max_length: int) -> dict[str, list[int]]:
    """input_ids/attention_mask/labels with the loss only on the answer tokens (prompt positions are -100).

    The prompt is truncated from the left of the premise side if needed; the answer is never cut.
    """
    prompt_ids = tokenizer(generation_prompt(tokenizer, example), add_special_tokens=False).input_ids
    answer_ids = tokenizer(answer_text(tokenizer, example), add_special_tokens=False).input_ids
    if len(answer_ids) >= max_length:
        raise ValueError(f"max_length {max_length} leaves no room for the prompt")
    room = max_length - len(answer_ids)
    if len(prompt_ids) > room:
        prompt_ids = prompt_ids[len(prompt_ids) - room:]
    ids = prompt_ids + answer_ids
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * len(prompt_ids) + answer_ids}


def classification_features(tokenizer, example: NLIExample, max_length: int) -> dict[str, list[int]]:
    text = CLASSIFICATION_TEMPLATE.format(premise=example.premise, hypothesis=example.hypothesis)
    encoded = tokenizer(text, truncation=True, max_length=max_length)
    return {"input_ids": encoded.input_ids, "attention_mask": encoded.attention_mask, "labels": example.label}


# --- metrics -----------------------------------------------------------------------------------------------------


def classification_metrics(labels: Sequence[int], predictions: Sequence[int]) -> dict:
    """Accuracy, per-class precision/recall/F1, macro F1 and the confusion matrix (rows gold, columns predicted).

    The confusion matrix has a last column "invalid" for answers that named no label; they count as wrong.
    """
    if len(labels) != len(predictions):
        raise ValueError(f"{len(labels)} labels but {len(predictions)} predictions")
    n = len(LABELS)
    matrix = [[0] * (n + 1) for _ in range(n)]
    for gold, predicted in zip(labels, predictions):
        matrix[gold][predicted if 0 <= predicted < n else n] += 1
    total = len(labels)
    correct = sum(matrix[i][i] for i in range(n))
    per_class = {}
    for i, name in enumerate(LABELS):
        true_positive = matrix[i][i]
        predicted_count = sum(matrix[g][i] for g in range(n))
        gold_count = sum(matrix[i])
        precision = true_positive / predicted_count if predicted_count else 0.0
        recall = true_positive / gold_count if gold_count else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": gold_count}
    return {
        "accuracy": correct / total if total else 0.0,
        "macro_f1": sum(c["f1"] for c in per_class.values()) / n,
        "per_class": per_class,
        "invalid": sum(row[n] for row in matrix),
        "count": total,
        "confusion_matrix": {"rows_gold": list(LABELS), "columns_predicted": [*LABELS, "invalid"], "matrix": matrix},
    }

"""Natural language inference (MNLI) for the recipes: data, prompts, label-word parsing and metrics.

Everything here runs offline: local JSON/JSONL/CSV files with MNLI's fields, or `nyu-mll/multi_nli` through
`datasets` when the hub is reachable. Metrics are computed locally (`evaluate.load` would need the network).
"""

from __future__ import annotations

import csv
import json
import logging
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

#: MNLI's label ids, in order: 0 entailment, 1 neutral, 2 contradiction.
LABELS: tuple[str, ...] = ("entailment", "neutral", "contradiction")
FIELDS: tuple[str, ...] = ("premise", "hypothesis", "label")
MNLI_DATASET = "nyu-mll/multi_nli"
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


# --- data --------------------------------------------------------------------------------------------------------


def _read_rows(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    if suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number}: not valid JSON: {error}") from None
        return rows
    if suffix == ".json":
        data = json.loads(text)
        if isinstance(data, dict) and "data" in data:
            data = data["data"]
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of examples (or {{'data': [...]}})")
        return data
    if suffix in (".csv", ".tsv"):
        return list(csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ","))
    raise ValueError(f"{path}: unsupported data file type {suffix!r}; use .jsonl, .json, .csv or .tsv")


def examples_from_rows(rows: Iterable[dict], source: str = "data", *, drop_unlabeled: bool = True) -> list[NLIExample]:
    """Validate rows with MNLI's fields; a missing field or an unknown label names the row."""
    examples = []
    for number, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{source}: example {number} is not an object with fields {', '.join(FIELDS)}")
        missing = [name for name in FIELDS if name not in row or row[name] is None]
        if missing:
            raise ValueError(f"{source}: example {number} lacks field(s) {', '.join(missing)} "
                             f"(has {', '.join(sorted(row)) or 'nothing'})")
        if drop_unlabeled and row["label"] in (-1, "-1"):  # MNLI marks examples without gold label with -1
            continue
        label = label_id(row["label"], where=f" in {source} example {number}")
        example_id = row.get("id", row.get("pairID", number))
        examples.append(NLIExample(str(row["premise"]), str(row["hypothesis"]), label, str(example_id)))
    return examples


def load_file(path: str | Path) -> list[NLIExample]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"NLI data file {path} does not exist")
    return examples_from_rows(_read_rows(path), str(path))


def load_hub_split(dataset: str, split: str) -> list[NLIExample]:
    """One split of a hub dataset with MNLI's fields (needs the network or a warm `datasets` cache)."""
    from datasets import load_dataset

    data = load_dataset(dataset, split=split)
    missing = [name for name in FIELDS if name not in data.column_names]
    if missing:
        raise ValueError(f"{dataset}[{split}] lacks field(s) {', '.join(missing)} (has {', '.join(data.column_names)})")
    return examples_from_rows(data.select_columns(list(FIELDS) + (["pairID"] if "pairID" in data.column_names
                                                                   else [])), f"{dataset}[{split}]")


def sample_splits(pools: dict[str, list[NLIExample]], requests: Sequence[tuple[str, str, int | None]],
                  seed: int) -> dict[str, list[NLIExample]]:
    """Seeded subsets: `requests` are (name, pool, size); subsets drawn from one pool never overlap.

    Each pool is shuffled once with `seed` and handed out in request order, so the eval subset stays the same
    when the test subset grows, and eval and test drawn from the same split are disjoint by construction.
    A size of None means the whole rest of the pool, 0 an empty subset.
    """
    orders = {}
    for name, pool, size in requests:
        if pool not in pools:
            raise ValueError(f"split {name!r} asks for pool {pool!r}, which is not loaded ({', '.join(pools)})")
        if pool not in orders:
            order = list(range(len(pools[pool])))
            random.Random(f"{seed}-{pool}").shuffle(order)
            orders[pool] = order
    taken = {pool: 0 for pool in orders}
    out = {}
    for name, pool, size in requests:
        start, available = taken[pool], len(orders[pool]) - taken[pool]
        if size is not None and size < 0:
            raise ValueError(f"{name}_size must be >= 0 (or null for all that is left), got {size}")
        count = available if size is None else size
        if count > available:
            raise ValueError(f"{name} asks for {size} examples from {pool!r} but only {available} are left "
                             f"({len(orders[pool])} in total, {start} already used by earlier splits)")
        out[name] = [pools[pool][i] for i in orders[pool][start:start + count]]
        taken[pool] = start + count
    return out


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


# --- splits for a run --------------------------------------------------------------------------------------------

#: The small NLI file shipped with the package (48 examples written for the tests and the CPU smoke recipe).
SAMPLE_NAME = "sample"


def sample_file() -> Path:
    return Path(__file__).parent / "data" / "nli_sample.jsonl"


def load_run_splits(data, seed: int) -> dict[str, list[NLIExample]]:
    """train/eval/test subsets for a `DataConfig`: local files if given, else `data.dataset`.

    Files: eval defaults to the train file and test to the eval file; subsets drawn from one file are disjoint.
    Hub dataset: pools are its splits (`train_split`, `eval_split`, `test_split`); eval and test drawn from the
    same split are disjoint. `dataset: sample` is the bundled sample file. The train subset is always drawn first,
so an evaluation-only recipe with the same data settings and seed scores exactly the fine-tuning run's subsets.
    """
    requests: list[tuple[str, str, int | None]] = []
    pools: dict[str, list[NLIExample]] = {}
    if data.train_file or data.eval_file or data.test_file or data.dataset == SAMPLE_NAME:
        default = str(sample_file()) if data.dataset == SAMPLE_NAME else None
        train_file = data.train_file or default
        eval_file = data.eval_file or train_file
        test_file = data.test_file or eval_file
        files = {"train": train_file, "eval": eval_file, "test": test_file}
        for name, path in files.items():
            if path is None:
                raise ValueError(f"data: no file for the {name} split (set data.{name}_file)")
            if path not in pools:
                pools[path] = load_file(path)
        named = files
    else:
        if not data.dataset:
            raise ValueError("data: set data.dataset (e.g. nyu-mll/multi_nli) or data.train_file")
        named = {"train": data.train_split, "eval": data.eval_split, "test": data.test_split}
        for name, split in named.items():
            if split not in pools:
                pools[split] = load_hub_split(data.dataset, split)
    for name in ("train", "eval", "test"):  # always in this order, so every recipe sees the same subsets
        size = getattr(data, f"{name}_size")
        requests.append((name, named[name], size))
    splits = sample_splits(pools, requests, seed)
    for name, examples in splits.items():
        logger.info("%s: %d examples from %s", name, len(examples), named[name])
    return splits

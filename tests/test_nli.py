"""NLI data, prompts, label-word parsing and metrics (no model needed except the embedded tokenizer)."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from selective_attention.recipes import nli, nli_data
from selective_attention.recipes.arguments import DataArguments
from selective_attention.recipes.nli import INVALID, NLIExample, classification_metrics, parse_label


@pytest.mark.parametrize("text, expected", [
    ("entailment", 0),
    ("Neutral.", 1),
    ("**Contradiction**", 2),
    ('"ENTAILMENT"', 0),
    ("contradiction<|im_end|>", 2),
    ("  neutral\n\nThe premise says nothing about it.", 1),
    ("The premise entails the hypothesis.", 0),
    ("The hypothesis contradicts the premise", 2),
    ("This is a contradiction: the street cannot be empty and crowded.", 2),
    ("Contradiction. The premise does not entail the hypothesis.", 2),
    ("The premise does not entail the hypothesis; it is a contradiction.", 2),
    ("It's not a contradiction, it's neutral", 1),
    ("Neither entailment nor contradiction: neutral", 1),
    ("Options: entailment, neutral, contradiction. Answer: neutral", 1),
    ("The answer is: contradiction", 2),
    ("No, contradiction", 2),
    ("neutrality", 1),
    ("not entailment", INVALID),
    ("The hypothesis is not necessarily entail", INVALID),
    ("I don't know", INVALID),
    ("A woman is outside in wet", INVALID),
    ("antithesis", INVALID),
    ("", INVALID),
])
def test_parse_label_tricky_outputs(text, expected):
    assert parse_label(text) == expected


def test_label_id_accepts_names_and_ids_and_names_bad_values():
    assert [nli.label_id(v) for v in ("entailment", "Neutral", " CONTRADICTION ", 0, 1, "2")] == [0, 1, 2, 0, 1, 2]
    for bad in ("entails", 3, -1, True, None, "yes"):
        with pytest.raises(ValueError, match="unknown label"):
            nli.label_id(bad)


def test_bundled_sample_file_is_balanced_and_valid():
    examples = nli_data.load_file(nli_data.sample_file())
    assert len(examples) >= 36
    assert Counter(e.label for e in examples) == {0: len(examples) // 3, 1: len(examples) // 3, 2: len(examples) // 3}
    assert len({e.id for e in examples}) == len(examples)


def test_local_files_jsonl_json_csv_agree(tmp_path):
    rows = [{"premise": "A cat sleeps.", "hypothesis": "An animal rests.", "label": "entailment"},
            {"premise": "A cat sleeps.", "hypothesis": "The cat runs.", "label": 2}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "d.json").write_text(json.dumps({"data": rows}))
    (tmp_path / "d.csv").write_text("premise,hypothesis,label\nA cat sleeps.,An animal rests.,entailment\n"
                                    "A cat sleeps.,The cat runs.,2\n")
    loaded = [nli_data.load_file(tmp_path / name) for name in ("d.jsonl", "d.json", "d.csv")]
    for examples in loaded:
        assert [(e.premise, e.hypothesis, e.label) for e in examples] == [
            ("A cat sleeps.", "An animal rests.", 0), ("A cat sleeps.", "The cat runs.", 2)]


def test_missing_field_and_unknown_label_are_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"premise": "p", "label": "neutral"}) + "\n")
    with pytest.raises(ValueError, match="lacks field.*hypothesis"):
        nli_data.load_file(path)
    path.write_text(json.dumps({"premise": "p", "hypothesis": "h", "label": "maybe"}) + "\n")
    with pytest.raises(ValueError, match="unknown label 'maybe'.*example 0"):
        nli_data.load_file(path)
    with pytest.raises(FileNotFoundError):
        nli_data.load_file(tmp_path / "missing.jsonl")
    (tmp_path / "x.parquet").write_text("")
    with pytest.raises(ValueError, match="unsupported data file type"):
        nli_data.load_file(tmp_path / "x.parquet")


def test_mnli_unlabeled_rows_are_dropped():
    rows = [{"premise": "p", "hypothesis": "h", "label": -1}, {"premise": "p", "hypothesis": "h", "label": 1}]
    assert [e.label for e in nli_data.examples_from_rows(rows)] == [1]


def _pool(prefix: str, n: int) -> list[NLIExample]:
    return [NLIExample(f"{prefix} p{i}", f"h{i}", i % 3, f"{prefix}-{i}") for i in range(n)]


def test_sample_splits_are_seeded_disjoint_and_stable():
    pools = {"val": _pool("val", 40), "train": _pool("train", 30)}
    requests = [("train", "train", 10), ("eval", "val", 8), ("test", "val", 12)]
    first = nli_data.sample_splits(pools, requests, seed=3)
    again = nli_data.sample_splits(pools, requests, seed=3)
    other = nli_data.sample_splits(pools, requests, seed=4)
    assert first == again and first != other
    assert not {e.id for e in first["eval"]} & {e.id for e in first["test"]}
    grown = nli_data.sample_splits(pools, [("train", "train", 10), ("eval", "val", 8), ("test", "val", 30)], seed=3)
    assert grown["eval"] == first["eval"] and grown["test"][:12] == first["test"]
    rest = nli_data.sample_splits(pools, [("eval", "val", 8), ("test", "val", None)], seed=3)
    assert len(rest["test"]) == 32
    with pytest.raises(ValueError, match="only 32 are left"):
        nli_data.sample_splits(pools, [("eval", "val", 8), ("test", "val", 33)], seed=3)


def _data(**overrides) -> DataArguments:
    settings = dict(dataset="nyu-mll/multi_nli", train_split="train", eval_split="validation_matched",
                    test_split="validation_matched", train_size=5, eval_size=4, test_size=6, max_length=128)
    settings.update(overrides)
    return DataArguments(**settings)


def test_run_splits_from_hub_use_the_named_splits(monkeypatch):
    calls = []

    def fake(dataset, split):
        calls.append((dataset, split))
        return _pool(split, 20)

    monkeypatch.setattr(nli_data, "load_hub_split", fake)
    splits = nli_data.load_run_splits(_data(), seed=0)
    assert sorted(calls) == [("nyu-mll/multi_nli", "train"), ("nyu-mll/multi_nli", "validation_matched")]
    assert all(e.id.startswith("train-") for e in splits["train"])
    assert all(e.id.startswith("validation_matched-") for e in splits["eval"] + splits["test"])
    assert not {e.id for e in splits["eval"]} & {e.id for e in splits["test"]}
    assert [len(splits[name]) for name in ("train", "eval", "test")] == [5, 4, 6]


def test_run_splits_from_one_file_are_disjoint():
    splits = nli_data.load_run_splits(_data(dataset="sample", train_size=20, eval_size=10, test_size=None), seed=1)
    ids = [{e.id for e in splits[name]} for name in ("train", "eval", "test")]
    assert [len(s) for s in ids] == [20, 10, 18]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])


def test_metrics_by_hand():
    labels = [0, 0, 1, 1, 2, 2]
    predictions = [0, 1, 1, INVALID, 2, 0]
    metrics = classification_metrics(labels, predictions)
    assert metrics["accuracy"] == pytest.approx(3 / 6)
    assert metrics["invalid"] == 1
    assert metrics["confusion_matrix"]["matrix"] == [[1, 1, 0, 0], [0, 1, 0, 1], [1, 0, 1, 0]]
    entail = metrics["per_class"]["entailment"]  # tp 1, predicted 2, gold 2
    assert (entail["precision"], entail["recall"], entail["f1"]) == (0.5, 0.5, 0.5)
    neutral = metrics["per_class"]["neutral"]  # tp 1, predicted 2, gold 2
    assert neutral["f1"] == pytest.approx(0.5)
    contra = metrics["per_class"]["contradiction"]  # tp 1, predicted 1, gold 2
    assert contra["precision"] == 1.0 and contra["recall"] == 0.5 and contra["f1"] == pytest.approx(2 / 3)
    assert metrics["macro_f1"] == pytest.approx((0.5 + 0.5 + 2 / 3) / 3)
    with pytest.raises(ValueError):
        classification_metrics([0], [0, 1])


@pytest.fixture(scope="module")
def tokenizer(embedded_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_model_dir)


def test_generative_features_put_the_loss_only_on_the_answer(tokenizer):
    example = NLIExample("A dog runs in the park.", "An animal is outside.", 0)
    features = nli.generative_features(tokenizer, example, max_length=256)
    labels = features["labels"]
    answer = [token for token in labels if token != -100]
    assert labels[: len(labels) - len(answer)] == [-100] * (len(labels) - len(answer))
    assert tokenizer.decode(answer) == "entailment" + tokenizer.eos_token
    prompt = tokenizer.decode(features["input_ids"][: len(labels) - len(answer)])
    assert "Premise: A dog runs in the park." in prompt and "Hypothesis: An animal is outside." in prompt
    assert "entailment, neutral, contradiction" in prompt and prompt.endswith("assistant\n")
    short = nli.generative_features(tokenizer, example, max_length=40)
    assert len(short["input_ids"]) == 40 and [t for t in short["labels"] if t != -100] == answer

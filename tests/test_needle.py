"""Haystack, needle insertion at sentence boundaries, needle files, masks, and the NIAH grid."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from selective_attention.heads import save_head_scores
from selective_attention.retrieval.evaluate import NeedleConfig, load_results, resolve_mask, run_needle_grid
from selective_attention.retrieval.corpus import load_haystack_text
from selective_attention.retrieval.haystack import Haystack, build_prompt, prompt_template
from selective_attention.retrieval.needles import Needle, builtin_needles, load_needles, resolve_needles
from tests.conftest import build_tiny, tiny_llama_config

TEXT = ("Alpha beta gamma. Delta epsilon zeta eta theta! Version 3.5 shipped today. \"Is it done?\" she asked.\n\n"
        "New paragraph starts here. Another sentence follows it. ") * 40


@pytest.fixture(scope="module")
def tokenizer(embedded_model_dir):
    return AutoTokenizer.from_pretrained(embedded_model_dir)


class SlowTokenizer:
    """The same vocabulary without offsets, to exercise the sentence-by-sentence path."""

    is_fast = False

    def __init__(self, inner) -> None:
        self.inner = inner

    def __call__(self, text, **kwargs):
        kwargs.pop("return_offsets_mapping", None)
        return self.inner(text, **kwargs)

    def decode(self, ids, **kwargs):
        return self.inner.decode(ids, **kwargs)


def test_builtin_needles():
    needles = builtin_needles()
    assert len(needles) >= 3
    assert needles[0].name == "sf" and "Dolores Park" in needles[0].needle
    assert len({n.name for n in needles}) == len(needles)
    assert resolve_needles(None) == [needles[0]]
    assert resolve_needles("all") == needles
    with pytest.raises(ValueError, match="unknown needle"):
        resolve_needles("sf,nope")


def test_needle_jsonl(tmp_path):
    good = tmp_path / "needles.jsonl"
    good.write_text(json.dumps({"needle": "The code is 42.", "question": "What is the code?", "answer": "42"}) + "\n\n")
    (needle,) = load_needles(good)
    assert needle.answer == "42" and needle.name.startswith("n")
    assert resolve_needles(str(good)) == [needle]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"needle": "x", "question": "y"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: missing field\(s\) answer"):
        load_needles(bad)
    bad.write_text(json.dumps({"needle": "", "question": "y", "answer": "z"}) + "\n")
    with pytest.raises(ValueError, match="non-empty"):
        load_needles(bad)
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_needles(bad)
    with pytest.raises(FileNotFoundError):
        load_needles(tmp_path / "missing.jsonl")


@pytest.mark.parametrize("slow", [False, True])
def test_insertion_at_sentence_boundaries(tokenizer, slow):
    tok = SlowTokenizer(tokenizer) if slow else tokenizer
    haystack = Haystack(tok, TEXT, min_tokens=300)
    template = prompt_template(tokenizer, "What?")
    needle = builtin_needles()[1]
    for depth in (0, 10, 25, 33, 50, 75, 90, 100):
        prompt = build_prompt(haystack, template, needle, 300, depth)
        start, end = prompt.needle_span
        assert prompt.context_length == 300
        assert tokenizer.decode(prompt.input_ids[start:end]).strip() == needle.needle
        before = tokenizer.decode(prompt.input_ids[len(template.header_ids):start])
        if depth == 0:
            assert start == len(template.header_ids) and prompt.actual_depth == 0
        elif depth == 100:
            assert prompt.input_ids[end:] == template.tail_ids and prompt.actual_depth == 100
        else:
            assert before.rstrip()[-1] in ".!?\"", before[-40:]
            assert not before.rstrip().endswith("3.")  # "3.5" is no sentence boundary
            assert depth - 15 <= prompt.actual_depth <= depth


def test_boundaries_found_from_text_not_ids(tokenizer):
    haystack = Haystack(tokenizer, TEXT, min_tokens=200)
    for index in haystack.boundaries[:30]:
        text = tokenizer.decode(haystack.ids[:index])
        assert text.rstrip()[-1] in ".!?\"" and not text.endswith("3.")


def test_chat_and_plain_templates(tokenizer):
    chat = prompt_template(tokenizer, "Where?")
    assert chat.chat and tokenizer.decode(chat.header_ids).startswith("<|im_start|>")
    assert tokenizer.decode(chat.tail_ids).endswith("<|im_start|>assistant\n")
    plain = prompt_template(tokenizer, "Where?", chat=False)
    assert not plain.chat and tokenizer.decode(plain.tail_ids).endswith("Answer:")


def test_haystack_sources(tmp_path, haystack_dir, tokenizer):
    assert "Paul" in load_haystack_text(haystack_dir) or len(load_haystack_text(haystack_dir)) > 100_000
    short = tmp_path / "short.txt"
    short.write_text("One short sentence. Two short sentences.")
    haystack = Haystack(tokenizer, load_haystack_text(short), min_tokens=100)  # repeated to reach the length
    assert len(haystack.ids) >= 100
    with pytest.raises(FileNotFoundError):
        load_haystack_text(tmp_path / "nothing")
    with pytest.raises(ValueError, match="exceeds the haystack"):
        build_prompt(haystack, prompt_template(tokenizer, "q"), builtin_needles()[0], 10_000, 50)


def test_resolve_mask(tmp_path):
    scores = {f"{l}-{h}": [float(l * 4 + h)] for l in range(2) for h in range(4)}
    path = tmp_path / "head_scores.json"
    save_head_scores(path, scores, {"model": "tiny", "num_layers": 2, "num_heads": 4})
    assert resolve_mask("top:2", 2, 4, path) == [(1, 2), (1, 3)]
    assert resolve_mask("bottom:1", 2, 4, path) == [(0, 0)]
    random_heads = resolve_mask("random:3", 2, 4, path, seed=5)
    assert random_heads == resolve_mask("random:3", 2, 4, path, seed=5)
    assert not set(random_heads) & {(1, 1), (1, 2), (1, 3)}
    assert resolve_mask("0-1,1-0", 2, 4) == [(0, 1), (1, 0)]
    assert resolve_mask(None, 2, 4) == []
    with pytest.raises(ValueError, match="unknown mask spec"):
        resolve_mask("best:3", 2, 4, path)
    with pytest.raises(ValueError, match="asked for 9 heads"):
        resolve_mask("top:9", 2, 4, path)
    with pytest.raises(ValueError, match="needs --head-scores"):
        resolve_mask("top:2", 2, 4)
    with pytest.raises(ValueError, match="30 x 9"):
        resolve_mask("top:2", 30, 9, path)
    with pytest.raises(ValueError, match="out of range"):
        resolve_mask("5-0", 2, 4)


@pytest.fixture
def tiny(tokenizer):
    config = tiny_llama_config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return build_tiny(config, "sdpa", seed=0)


def test_needle_grid_resumes_and_records_masks(tmp_path, tiny, tokenizer):
    config = NeedleConfig(lengths=[64, 96], depths=[0, 100], needles=resolve_needles("sf"), mask="0-1,1-3",
                          mask_mode="uniform", max_new_tokens=4)
    results = run_needle_grid(tiny, tokenizer, config, tmp_path / "run", model_name="tiny", progress=False)
    assert len(results) == 4
    point = results[0]
    for field in ("model", "context_length", "depth_percent", "needle", "model_response", "score", "masked_heads",
                  "mask_mode"):
        assert field in point
    assert point["masked_heads"] == ["0-1", "1-3"] and point["mask_mode"] == "uniform"
    assert 0 <= point["score"] <= 100
    assert tiny.config._attn_implementation == "sdpa"  # mask removed afterwards
    files = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").glob("*_results.json")}
    again = run_needle_grid(tiny, tokenizer, config, tmp_path / "run", model_name="tiny", progress=False)
    assert again == results
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").glob("*_results.json")} == files
    other = NeedleConfig(lengths=[64], depths=[0], needles=resolve_needles("sf"), mask="0-0", max_new_tokens=4)
    with pytest.raises(ValueError, match="masked_heads"):
        run_needle_grid(tiny, tokenizer, other, tmp_path / "run", model_name="tiny", progress=False)
    assert len(load_results(tmp_path / "run")) == 4


def test_masked_grid_equals_manual_masking(tmp_path, tiny, tokenizer):
    """Prefix reuse under a mask gives the same answers as full prefill."""
    grid = dict(lengths=[96], depths=[0, 50, 100], needles=resolve_needles("sf"), mask="0-0,1-2", max_new_tokens=5)
    reused = run_needle_grid(tiny, tokenizer, NeedleConfig(**grid), tmp_path / "a", model_name="t", progress=False)
    plain = run_needle_grid(tiny, tokenizer, NeedleConfig(**grid, reuse_prefix=False), tmp_path / "b",
                            model_name="t", progress=False)
    assert [r["model_response"] for r in reused] == [r["model_response"] for r in plain]


@pytest.mark.parametrize("bad, match", [(dict(mask_mode="half"), "mask mode"), (dict(score_against="x"), "score_against"),
                                        (dict(depths=[-1]), "depths")])
def test_bad_needle_config(bad, match):
    settings = dict(lengths=[64], depths=[0], needles=resolve_needles("sf"))
    settings.update(bad)
    with pytest.raises(ValueError, match=match):
        NeedleConfig(**settings)


def test_needle_requires_fields():
    with pytest.raises(ValueError, match="question"):
        Needle("a needle", "", "an answer")


@pytest.fixture
def tiny_dir(tmp_path, tiny, tokenizer):
    path = tmp_path / "tiny-model"
    tiny.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_cli_detect_needle_plot(tmp_path, tiny_dir, capsys):
    from selective_attention.cli import main

    scores = tmp_path / "head_scores.json"
    grid = ["--lengths", "64", "--depths", "0,100", "--max-new-tokens", "3"]
    assert main(["detect", "--model", str(tiny_dir), *grid, "--output", str(scores), "--export-duo",
                 str(tmp_path / "duo.tsv"), "--duo-top", "2"]) == 0
    assert "2 new trials" in capsys.readouterr().out
    assert len((tmp_path / "duo.tsv").read_text().splitlines()) == 2
    before = scores.read_text()
    assert main(["detect", "--model", str(tiny_dir), *grid, "--output", str(scores)]) == 0
    assert "0 new trials" in capsys.readouterr().out and scores.read_text() == before

    run = tmp_path / "run"
    assert main(["needle", "--model", str(tiny_dir), *grid, "--output", str(run), "--mask", "random:2",
                 "--seed", "3", "--head-scores", str(scores)]) == 0
    assert len(load_results(run)) == 2
    # bad input: clear error (exit code 2), nothing written
    for bad in (["--mask", "top:99", "--head-scores", str(scores)], ["--mask", "best:2", "--head-scores", str(scores)],
                ["--mask", "top:2", "--head-scores", str(tmp_path / "missing.json")], ["--lengths", "100000"],
                ["--needles", str(tmp_path / "none.jsonl")]):
        target = tmp_path / "bad"
        assert main(["needle", "--model", str(tiny_dir), *grid, "--output", str(target), *bad]) == 2
        assert not target.exists()
    assert main(["plot", "niah", str(run), "--output", str(tmp_path / "n.png")]) == 0


@pytest.mark.slow
def test_demo_runs(capsys):
    from selective_attention.cli import main

    assert main(["demo", "--context-tokens", "300", "--num-heads", "5", "--max-new-tokens", "24"]) == 0
    out = capsys.readouterr().out
    assert "unmasked:" in out and "top 5 retrieval heads masked" in out and "5 random heads masked" in out

"""Languages: sentence boundaries without spaces, needle insertion in zh/de haystacks, per-language ROUGE,
cross-lingual detection on a tiny random model."""

from __future__ import annotations

import json

import pytest
from rouge_score import rouge_scorer
from transformers import AutoTokenizer

from selective_attention.heads import load_sidecar
from selective_attention.retrieval.languages import (Language, get_language, register_language, supported_languages,
                                           LANGUAGES)
from selective_attention.retrieval.detect import DetectConfig, detect, plan
from selective_attention.retrieval.haystack import Haystack, build_prompt, prompt_template
from tests.conftest import build_tiny, tiny_llama_config


def english_rouge(target: str, prediction: str) -> float:
    """The Retrieval_Head reference's scoring, straight from rouge-score (stemmed rouge1 recall)."""
    return rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True).score(target, prediction)["rouge1"].recall

WIDE_ENDS = "。！？”"


@pytest.fixture(scope="module")
def tokenizer(embedded_model_dir):
    return AutoTokenizer.from_pretrained(embedded_model_dir)


@pytest.fixture
def tiny_real_vocab(tokenizer):
    config = tiny_llama_config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return build_tiny(config, "sdpa", seed=0).double()


# -- registry and bad input ----------------------------------------------------------------------------------------
def test_registry_has_en_zh_de_and_refuses_unknown_codes():
    assert {"en", "zh", "de"} <= set(supported_languages())
    assert get_language(None).code == "en" and get_language("ZH").code == "zh"
    with pytest.raises(ValueError, match="unsupported language 'xx'.*de, en, zh"):
        get_language("xx")
    with pytest.raises(ValueError, match="unsupported language"):
        DetectConfig(lengths=[64], depths=[0], needles=get_language("en").needles()[:1], language="klingon")
    with pytest.raises(ValueError, match="already registered"):
        register_language(Language(code="en", name="English again"))
    with pytest.raises(ValueError, match="segmenter"):
        Language(code="fr", name="French", segmenter="porter")


def test_a_new_language_from_user_files(tmp_path):
    needles = tmp_path / "fr.json"
    needles.write_text(json.dumps([{"name": "pain", "needle": "Le boulanger cuit un pain aux noix le jeudi.",
                                    "question": "Que cuit le boulanger le jeudi ?", "answer": "Un pain aux noix."}]),
                       encoding="utf-8")
    haystack = tmp_path / "fr.txt"
    haystack.write_text("Il pleut. Le café est chaud ! Où est la gare ? Élève.", encoding="utf-8")
    french = Language(code="fr", name="French", needles_file=str(needles), haystack_file=str(haystack))
    register_language(french)
    try:
        assert get_language("fr").resolve_needles(None)[0].name == "pain"
        assert get_language("fr").haystack_text().startswith("Il pleut.")
        assert french.tokenize("Élève été") == ["élève", "été"]
        with pytest.raises(ValueError, match="unknown French needle"):
            french.resolve_needles("baguette")
    finally:
        LANGUAGES.pop("fr")


# -- sentences -----------------------------------------------------------------------------------------------------
def test_chinese_sentences_end_without_spaces():
    zh = get_language("zh")
    text = "今天下雨了。我们去喝茶吧！你来吗？他说：“好的。”然后走了。价格是3.5元。"
    assert zh.split_sentences(text) == ["今天下雨了。", "我们去喝茶吧！", "你来吗？", "他说：“好的。”", "然后走了。",
                                       "价格是3.5元。"]
    assert "".join(zh.split_sentences(text)) == text
    assert not zh.is_sentence_start(text, text.index("”"))  # never between the stop and its closing quote


def test_german_sentences_skip_abbreviations_and_ordinals():
    de = get_language("de")
    text = "Das ist z. B. gut. Am 3. Mai kam er. „Wann kommt der Zug?“ Bald! Er kostet 3.5 Euro."
    assert [s.strip() for s in de.split_sentences(text)] == [
        "Das ist z. B. gut.", "Am 3. Mai kam er.", "„Wann kommt der Zug?“", "Bald!", "Er kostet 3.5 Euro."]


@pytest.mark.parametrize("code", ["zh", "de"])
def test_needle_lands_at_a_sentence_boundary(tokenizer, code):
    language = get_language(code)
    needle = language.needles()[0]
    haystack = Haystack(tokenizer, language.haystack_text(), min_tokens=400, language=language)
    assert len(haystack.boundaries) > 10
    template = prompt_template(tokenizer, needle.question, chat=True, language=language)
    header = len(template.header_ids)
    for depth in (0, 10, 25, 50, 75, 90, 100):
        prompt = build_prompt(haystack, template, needle, 400, depth)
        start, end = prompt.needle_span
        insert = start - header
        assert tokenizer.decode(prompt.input_ids[start:end]).strip() == needle.needle
        assert prompt.context_length == 400
        haystack_tokens = prompt.context_length - (end - start)
        if depth == 0:
            assert insert == 0 and prompt.actual_depth == 0
        elif depth == 100:
            assert insert == haystack_tokens and prompt.actual_depth == 100
        else:
            target = int(haystack_tokens * depth / 100)
            assert insert <= target and not [b for b in haystack.boundaries if insert < b <= target]
            if insert == 0:  # no sentence ends before the target: the start of the haystack
                assert haystack.boundaries[0] > target
                continue
            assert insert in haystack.boundaries
            before = tokenizer.decode(haystack.ids[:insert]).rstrip()
            ends = WIDE_ENDS if code == "zh" else ".!?“"
            assert before[-1] in ends, (depth, before[-20:])
            after = tokenizer.decode(haystack.ids[insert:insert + 12]).lstrip()
            assert after[0] != "\ufffd" and "\ufffd" not in before[-3:]  # no character cut in half
            assert prompt.actual_depth <= depth  # the boundary at or below the requested depth


def test_chinese_needle_is_joined_without_a_space(tokenizer):
    zh = get_language("zh")
    needle = zh.needles()[0]
    haystack = Haystack(tokenizer, zh.haystack_text(), min_tokens=300, language=zh)
    template = prompt_template(tokenizer, needle.question, chat=True, language=zh)
    prompt = build_prompt(haystack, template, needle, 300, 50)
    text = tokenizer.decode(prompt.input_ids)
    assert "。" + needle.needle in text or "！" + needle.needle in text or "？" + needle.needle in text
    assert "根据上面的文档" in text and needle.question in text


# -- ROUGE ---------------------------------------------------------------------------------------------------------
def test_chinese_rouge_scores_right_answers_high_and_wrong_ones_low():
    zh = get_language("zh")
    needle = zh.needles()[0].needle  # 打开花园工具棚的密码是蓝色橘子四十七。
    assert zh.rouge1_recall(needle, needle) == 1.0
    assert zh.rouge1_recall(needle, "根据文档，打开花园工具棚的密码是：蓝色橘子四十七！") == 1.0
    assert zh.rouge1_recall(needle, "我不知道这个问题的答案。") < 0.2
    assert zh.rouge1_recall(needle, "密码是红色苹果十二。") < 0.35
    # rouge-score's default tokenizer keeps only [a-z0-9]: Chinese answers would all score 0 (or be undefined)
    assert english_rouge(needle, needle) == 0.0
    assert zh.tokenize(needle)[-3:] == ["蓝色", "橘子", "四十七"]


def test_german_rouge_keeps_umlaut_words_and_does_not_stem():
    de = get_language("de")
    needle = de.needles()[1].needle  # Die Bäckerin ... Walnüssen und Honig.
    assert de.rouge1_recall(needle, needle) == 1.0
    assert "bäckerin" in de.tokenize(needle) and "walnüssen" in de.tokenize(needle)
    assert de.rouge1_recall("Walnüssen", "Walnuss") == 0.0  # no stemming
    assert de.rouge1_recall(needle, "Ich weiß es nicht.") < 0.1


def test_english_rouge_is_the_reference_scoring():
    en = get_language("en")
    for target, prediction in [("The best thing to do", "the best things to do"), ("Eat a sandwich", "eating")]:
        assert en.rouge1_recall(target, prediction) == english_rouge(target, prediction)


# -- detection -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("language,haystack_language", [("zh", "zh"), ("de", "de"), ("en", "zh"), ("en", "de")])
def test_detection_in_and_across_languages(tmp_path, tokenizer, tiny_real_vocab, language, haystack_language):
    needles = get_language(language).resolve_needles(None)
    config = DetectConfig(lengths=[96], depths=[0, 50, 100], needles=needles, max_new_tokens=4, rouge_threshold=-1.0,
                          language=language, haystack_language=haystack_language)
    _, prompts = plan(tokenizer, config)
    for prompt in prompts:
        text = tokenizer.decode(prompt.input_ids)
        assert needles[0].question in text
        span = tokenizer.decode(prompt.input_ids[slice(*prompt.needle_span)]).strip()
        assert span == needles[0].needle
    hay_text = get_language(haystack_language).haystack_text()
    assert tokenizer.decode(prompts[0].input_ids[prompts[0].needle_span[1]:][:30]).strip()[:4] in hay_text
    output = tmp_path / "scores.json"
    result = detect(tiny_real_vocab, tokenizer, config, output, model_name="tiny", progress=False)
    meta = load_sidecar(output)
    assert (meta["language"], meta["haystack_language"]) == (language, haystack_language)
    assert meta["settings"]["haystack_language"] == haystack_language
    assert meta["quantization"] is None
    assert result.new_trials == 3 and len(meta["trials"]) == 3
    other = "de" if haystack_language == "zh" else "zh"
    with pytest.raises(ValueError, match="haystack"):
        detect(tiny_real_vocab, tokenizer, DetectConfig(lengths=[96], depths=[0], needles=needles, max_new_tokens=4,
                                                       language=language, haystack_language=other),
               output, model_name="tiny", progress=False)

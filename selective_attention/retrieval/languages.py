"""Languages for needle tests: sentence boundaries, ROUGE tokenization, prompts, needles and haystacks per language.

The Retrieval_Head reference detects retrieval heads in English, Chinese and German, and "translation-retrieval"
heads with the needle in one language and the haystack in another. What changes with the language:

- where a sentence ends: Chinese has no spaces, its full stops are 。！？ and a boundary needs no whitespace after
  them, while "." in "3.5" must not count;
- how ROUGE tokenizes: rouge-score's default tokenizer keeps only [a-z0-9] and stems with an English Porter
  stemmer, which reduces Chinese to nothing and cuts German umlaut words apart, so Chinese answers are segmented
  with jieba and German ones split into Unicode words without stemming;
- the needles, the haystack and the prompt wording.

A `Language` is a small frozen dataclass; `register_language` adds more (e.g. French with segmenter "words").
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Callable

from selective_attention.retrieval.corpus import load_haystack_text
from selective_attention.retrieval.needles import _from_record, builtin_needles, resolve_needles

logger = logging.getLogger(__name__)

#: Sentence ends that need whitespace after them (so "3.5", "e.g.x" and "a.b" do not count).
SPACED_TERMINATORS = ".!?"
#: Sentence ends of scripts written without spaces (CJK full stops, fullwidth marks, ellipsis): no whitespace needed.
WIDE_TERMINATORS = "。！？｡…"
#: Closing quotes and brackets that may follow a sentence end and belong to the sentence.
CLOSERS = "\"'\u201d\u2019\u201c)]）」』》】〕"
_WINDOW = 48


@dataclass(frozen=True)
class Language:
    """Everything language-specific in a needle test.

    `segmenter`: how ROUGE tokenizes ("stem": rouge-score's English tokenizer with Porter stemming, as the reference
    scores English; "words": lowercase Unicode words, no stemming; "jieba": Chinese word segmentation; "chars":
    one token per CJK character, Unicode words otherwise). `separator` goes between the haystack and an inserted
    needle. `needles_file` / `haystack_file` name files in the package's data folder or anywhere on disk;
    `haystack_file=None` means the embedded English essays. `abbreviations` (lowercase, without the dot) and
    `ordinal_dot` keep "z. B." and "am 3. Mai" from counting as sentence ends.
    """

    code: str
    name: str
    segmenter: str = "words"
    separator: str = " "
    header: str = "Read the document below and answer the question after it.\n\nDocument:\n"
    instruction: str = "\n\nBased on the document above, answer the question in one sentence.\nQuestion: {question}"
    answer_cue: str = "\nAnswer:"
    needles_file: str | None = None
    haystack_file: str | None = None
    abbreviations: frozenset[str] = field(default_factory=frozenset)
    ordinal_dot: bool = False

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z]{2,3}([-_][A-Za-z0-9]+)*", self.code):
            raise ValueError(f"language code {self.code!r} must look like 'en', 'zh' or 'pt-BR'")
        if self.segmenter not in SEGMENTERS:
            raise ValueError(f"unknown segmenter {self.segmenter!r}; expected one of {', '.join(SEGMENTERS)}")
        if "{question}" not in self.instruction:
            raise ValueError("a language's instruction must contain {question}")

    # -- sentences ---------------------------------------------------------------------------------------------
    def is_sentence_start(self, text: str, start: int) -> bool:
        """Whether a token starting at character `start` begins a new sentence of `text`."""
        if start <= 0 or start > len(text):
            return False
        following = text[start:start + 1]
        if following and following in CLOSERS and not following.isspace():
            return False  # the sentence's closing quote is still to come
        window = text[max(0, start - _WINDOW):start]
        stripped = window.rstrip()
        core = stripped.rstrip(CLOSERS)
        if not core:
            return False
        last = core[-1]
        if last in WIDE_TERMINATORS:
            return True
        if last not in SPACED_TERMINATORS:
            return False
        if not (len(stripped) < len(window) or following.isspace()):
            return False
        if last == ".":
            word = re.search(r"(\S+)\.$", core)
            if word:
                token = word.group(1).lower().lstrip("(\"'\u201e\u201c")
                if token in self.abbreviations or (self.ordinal_dot and token.isdigit()):
                    return False
        return True

    def sentence_starts(self, text: str) -> list[int]:
        """Character offsets where sentences begin (after the first): right after a wide full stop, or at the first
        whitespace after a spaced one."""
        return [i for i in range(1, len(text)) if self.is_sentence_start(text, i)
                and not (text[i - 1].isspace() and self.is_sentence_start(text, i - 1))]

    def split_sentences(self, text: str) -> list[str]:
        """`text` cut at its sentence starts; the pieces join back to `text` exactly."""
        cuts = [0] + self.sentence_starts(text) + [len(text)]
        return [text[a:b] for a, b in zip(cuts, cuts[1:]) if b > a]

    # -- ROUGE -------------------------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[str]:
        """Tokens ROUGE compares (lowercase, punctuation dropped)."""
        return SEGMENTERS[self.segmenter](text)

    def rouge1_recall(self, target: str, prediction: str) -> float:
        """ROUGE-1 recall of `target` in `prediction` with this language's tokenization, in [0, 1]."""
        return float(_scorer(self.segmenter).score(target, prediction)["rouge1"].recall)

    # -- prompts, needles, haystacks ---------------------------------------------------------------------------
    def instruction_for(self, question: str) -> str:
        return self.instruction.format(question=question)

    def needles(self) -> list:
        """The built-in needles of this language."""
        if self.needles_file is None:
            return builtin_needles()
        return _read_needles(self.needles_file)

    def resolve_needles(self, spec: str | None) -> list:
        """`None` (this language's first needle), "all", built-in names "a,b", or a JSONL path."""
        if self.needles_file is None:  # English: the package's own needle set
            return resolve_needles(spec)
        return resolve_needles(spec, self.needles(), self.name)

    def haystack_text(self, source: str | Path | None = None) -> str:
        """Haystack text: `source` (a folder of .txt files, a file, or `dataset:NAME[:SPLIT[:COLUMN]]`) when given,
        else this language's built-in haystack (the embedded essays for English)."""
        if source is not None or self.haystack_file is None:
            return load_haystack_text(source)
        return _data_text(self.haystack_file)

    def describe(self) -> dict:
        return {"code": self.code, "name": self.name, "segmenter": self.segmenter}


# -- tokenizers for ROUGE ----------------------------------------------------------------------------------------
_WORD = re.compile(r"\w+", re.UNICODE)
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]")


def _words(text: str) -> list[str]:
    """Lowercase Unicode words, underscores dropped: keeps "größe" and "straße" whole; no stemming."""
    return [w for w in _WORD.findall(text.lower().replace("_", " ")) if w]


def _chars(text: str) -> list[str]:
    tokens: list[str] = []
    for word in _words(text):
        pieces = re.split(f"({_CJK.pattern})", word)
        tokens += [p for p in pieces if p]
    return tokens


@lru_cache(maxsize=1)
def _jieba():
    try:
        import jieba
    except ImportError as error:
        raise ImportError("Chinese ROUGE needs jieba for word segmentation: pip install jieba") from error
    jieba.setLogLevel(logging.WARNING)
    return jieba


def _jieba_words(text: str) -> list[str]:
    tokens = []
    for piece in _jieba().lcut(text.lower()):
        tokens += _words(piece) if not _CJK.search(piece) else [piece]
    return [t for t in tokens if t.strip()]


def _stemmed(text: str) -> list[str]:
    return _default_tokenizer().tokenize(text)


@lru_cache(maxsize=1)
def _default_tokenizer():
    from rouge_score.tokenizers import DefaultTokenizer

    return DefaultTokenizer(use_stemmer=True)


SEGMENTERS: dict[str, Callable[[str], list[str]]] = {
    "stem": _stemmed,
    "words": _words,
    "jieba": _jieba_words,
    "chars": _chars,
}


class _Tokenizer:
    """rouge-score's tokenizer protocol: an object with `tokenize(text) -> list[str]`."""

    def __init__(self, segmenter: str) -> None:
        self.segment = SEGMENTERS[segmenter]

    def tokenize(self, text: str) -> list[str]:
        return self.segment(text)


@lru_cache(maxsize=None)
def _scorer(segmenter: str):
    from rouge_score import rouge_scorer

    if segmenter == "stem":  # the reference's English scoring, unchanged
        return rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
    return rouge_scorer.RougeScorer(["rouge1"], tokenizer=_Tokenizer(segmenter))


# -- data files --------------------------------------------------------------------------------------------------
def _data_text(name: str) -> str:
    path = Path(name)
    if path.is_absolute() or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"language data file {path} does not exist")
        return path.read_text(encoding="utf-8")
    resource = resources.files("selective_attention").joinpath("data", name)
    if not resource.is_file():
        raise FileNotFoundError(f"built-in language data file data/{name} is missing from the package")
    return resource.read_text(encoding="utf-8")


def _read_needles(name: str) -> list:
    records = json.loads(_data_text(name))
    if not isinstance(records, list) or not records:
        raise ValueError(f"needle file {name} must hold a non-empty JSON list")
    return [_from_record(record, f"{name} item {i}") for i, record in enumerate(records)]


# -- registry ----------------------------------------------------------------------------------------------------
LANGUAGES: dict[str, Language] = {}


def register_language(language: Language, *, replace: bool = False) -> Language:
    """Make `language` available to `--language` / `--haystack-language`."""
    if language.code in LANGUAGES and not replace:
        raise ValueError(f"language {language.code!r} is already registered (pass replace=True)")
    LANGUAGES[language.code] = language
    return language


def get_language(code: str | Language | None) -> Language:
    """The registered language for `code` (None means English)."""
    if isinstance(code, Language):
        return code
    key = "en" if code is None else str(code).strip()
    if key not in LANGUAGES:
        lowered = key.lower()
        if lowered in LANGUAGES:
            return LANGUAGES[lowered]
        raise ValueError(f"unsupported language {code!r}; supported: {', '.join(sorted(LANGUAGES))} "
                         "(register more with selective_attention.retrieval.languages.register_language)")
    return LANGUAGES[key]


def supported_languages() -> list[str]:
    return sorted(LANGUAGES)


register_language(Language(code="en", name="English", segmenter="stem"))
register_language(Language(
    code="zh", name="Chinese", segmenter="jieba", separator="",
    header="请阅读下面的文档，然后回答文档后面的问题。\n\n文档：\n",
    instruction="\n\n根据上面的文档，用一句话回答问题。\n问题：{question}",
    answer_cue="\n回答：",
    needles_file="needles_zh.json", haystack_file="haystack_zh.txt",
))
register_language(Language(
    code="de", name="German", segmenter="words",
    header="Lies das folgende Dokument und beantworte die Frage danach.\n\nDokument:\n",
    instruction="\n\nBeantworte die Frage anhand des obigen Dokuments in einem Satz.\nFrage: {question}",
    answer_cue="\nAntwort:",
    needles_file="needles_de.json", haystack_file="haystack_de.txt",
    abbreviations=frozenset({"z", "b", "d", "h", "u", "a", "s", "usw", "bzw", "ca", "nr", "dr", "vgl", "etc", "sog",
                             "inkl", "evtl", "ggf", "bspw"}),
    ordinal_dot=True,
))

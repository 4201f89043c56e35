"""The retrieval tasks' configs, declared once: `DetectConfig` (retrieval-head detection) and `NeedleConfig` (the
NIAH grid). Each field's `metadata` carries its help text, choices and CLI spelling; `cli/arguments.py` derives the
`detect` and `needle` flags from them (`add_config_arguments`).

Field order is the order of the settings written into head-score sidecars and NIAH manifests: keep it.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field

from selective_attention.attention.masked import MASK_MODES
from selective_attention.cache.selection import SELECTION_METHODS
from selective_attention.retrieval.haystack import check_grid
from selective_attention.retrieval.languages import get_language, supported_languages
from selective_attention.retrieval.needles import Needle

METHODS = ("probe", "reference")  # detection: argmax probe during SDPA decoding | eager output_attentions
SCORE_TARGETS = ("needle", "answer")
KV_CACHES = ("dynamic", "headwise")


def parse_numbers(text: str, kind=float) -> list:
    """"400,800" -> [400, 800]; "0:100:25" -> 0, 25, ..., 100 (inclusive)."""
    try:
        if ":" in text:
            start, stop, step = (kind(part) for part in text.split(":"))
            if step <= 0:
                raise ValueError
            values, value = [], start
            while value <= stop + 1e-9:
                values.append(kind(value))
                value += step
            return values
        return [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"malformed list {text!r}: expected '1,2,3' or 'start:stop:step'") from None


def _lengths(text: str) -> list[int]:
    return parse_numbers(text, int)


def _language_help() -> str:
    return f"needle, question and ROUGE language ({', '.join(supported_languages())}; default en)"


# Fields both tasks share, in the order each dataclass lists them.
LENGTHS = dict(type=_lengths, cli_default="1000,2000",
               help="context lengths in tokens, '500,1000' or 'start:stop:step' (default 1000,2000)")
DEPTHS = dict(type=parse_numbers, cli_default="0:100:25", help="needle depths in percent (default 0:100:25)")
NEEDLES = dict(type=str, help="built-in needle names ('sf,violin'), 'all', or a JSONL file of needle/question/answer "
                    "(default: the language's first needle, 'sf' in English)")
HAYSTACK = dict(help="folder of .txt files, a text file or dataset:NAME[:SPLIT[:COLUMN]] (default: PG essays)")
CHAT = dict(flag="--no-chat", const=False, help="plain prompt even if the tokenizer has a chat template")
REUSE_PREFIX = dict(flag="--no-prefix-reuse", const=False, help="prefill every trial from scratch")
LANGUAGE = dict(help=_language_help)
HAYSTACK_LANGUAGE = dict(help="haystack language when it differs from --language (cross-lingual retrieval); its "
                              "built-in haystack is used unless --haystack names one")


@dataclass
class DetectConfig:
    """A detection grid and how to run it. `rouge_threshold` is the counting criterion (0.5 in the reference;
    tests on random models lower it to count every trial)."""

    lengths: list[int] = field(metadata=LENGTHS)
    depths: list[float] = field(metadata=DEPTHS)
    needles: list[Needle] = field(metadata=NEEDLES)
    method: str = field(default="probe", metadata={
        "choices": METHODS, "help": "probe: SDPA + argmax probe (fast); reference: eager decode with output_attentions"})
    max_new_tokens: int = 48
    rouge_threshold: float = field(default=0.5, metadata={
        "help": "a trial counts when its answer's ROUGE-1 recall of the needle exceeds this (0.5)"})
    save_inputs: bool = field(default=False, metadata={"help": "store each trial's prompt token ids in the sidecar"})
    haystack: str | None = field(default=None, metadata=HAYSTACK)
    chat: bool | None = field(default=None, metadata=CHAT)
    reuse_prefix: bool = field(default=True, metadata=REUSE_PREFIX)
    language: str = field(default="en", metadata=LANGUAGE)  # needle, question and ROUGE language
    haystack_language: str | None = field(default=None, metadata=HAYSTACK_LANGUAGE)  # None: same as `language`
    decode_batch: int = field(default=8, metadata={
        "help": "probe: decode up to this many trials of one prompt length together (1: one at a time)"})

    def __post_init__(self) -> None:
        self.language = get_language(self.language).code
        self.haystack_language = get_language(self.haystack_language or self.language).code
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; expected one of {', '.join(METHODS)}")
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if self.decode_batch < 1:
            raise ValueError(f"decode_batch must be at least 1, got {self.decode_batch}")
        self.lengths, self.depths = check_grid(self.lengths, self.depths, self.needles)

    def settings(self) -> dict:
        data = asdict(self)
        data["needles"] = [n.to_dict() for n in self.needles]
        return data


@dataclass
class NeedleConfig:
    """A NIAH grid, optionally with heads masked (`mask`) or a head-wise KV cache (`kv_cache`)."""

    lengths: list[int] = field(metadata=LENGTHS)
    depths: list[float] = field(metadata=DEPTHS)
    needles: list[Needle] = field(metadata=NEEDLES)
    mask: str | None = field(default=None, metadata={  # top:K | bottom:K | random:K | L-H,L-H
        "help": "heads to mask: top:K, bottom:K, random:K (seeded, never a top-K head) or 'L-H,L-H'"})
    seed: int = field(default=0, metadata={"help": "seed of random:K"})
    mask_mode: str = field(default="zero", metadata={
        "choices": MASK_MODES, "help": "how masked heads are ablated: zero output, uniform attention, mean output"})
    head_scores: str | None = field(default=None, metadata={"help": "head_scores.json from `selective-attention detect`"})
    max_new_tokens: int = 48
    haystack: str | None = field(default=None, metadata=HAYSTACK)
    chat: bool | None = field(default=None, metadata=CHAT)
    score_against: str = field(default="needle", metadata={
        "choices": SCORE_TARGETS, "help": "ROUGE-1 recall of the needle sentence (reference) or of the expected answer"})
    reuse_prefix: bool = field(default=True, metadata=REUSE_PREFIX)
    language: str = field(default="en", metadata=LANGUAGE)  # needle, question and ROUGE language
    haystack_language: str | None = field(default=None, metadata=HAYSTACK_LANGUAGE)  # None: same as `language`
    kv_cache: str = field(default="dynamic", metadata={
        "choices": KV_CACHES, "help": "headwise: retrieval KV heads keep the whole context, the others sink + window"})
    full_kv_heads: str = field(default="0.25", metadata={
        "help": "head-wise: KV heads kept full, a count (23) or a fraction of all KV heads (0.25)"})
    kv_select: str = field(default="top", metadata={
        "choices": SELECTION_METHODS,
        "help": "head-wise: top retrieval KV heads (--head-scores) or seeded random ones (--seed)"})
    sink: int = field(default=64, metadata={"help": "head-wise: first positions every head keeps"})
    window: int = field(default=256, metadata={"help": "head-wise: recent positions streaming heads keep"})
    prefill_chunk: int | None = field(default=None, metadata={
        "help": "head-wise: prefill in chunks of this many tokens (lower peak memory)"})

    def __post_init__(self) -> None:
        if self.kv_cache not in KV_CACHES:
            raise ValueError(f"unknown kv_cache {self.kv_cache!r}; expected one of {KV_CACHES}")
        if self.kv_select not in SELECTION_METHODS:
            raise ValueError(f"unknown kv_select {self.kv_select!r}; expected one of {SELECTION_METHODS}")
        self.language = get_language(self.language).code
        self.haystack_language = get_language(self.haystack_language or self.language).code
        if self.mask_mode not in MASK_MODES:
            raise ValueError(f"unknown mask mode {self.mask_mode!r}; expected one of {', '.join(MASK_MODES)}")
        if self.score_against not in SCORE_TARGETS:
            raise ValueError(f"score_against must be one of {SCORE_TARGETS}, got {self.score_against!r}")
        self.lengths, self.depths = check_grid(self.lengths, self.depths, self.needles)


#: NeedleConfig fields that configure the head-wise KV cache (the `demo` command takes them too)
KV_CACHE_FIELDS = ("kv_cache", "full_kv_heads", "kv_select", "sink", "window", "prefill_chunk")

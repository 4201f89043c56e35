"""Haystack text and needle insertion at sentence boundaries, for any tokenizer.

Prompts are assembled at token level (template header + haystack[:b] + needle + haystack[b:H] + template tail),
so every trial on one haystack shares its first tokens exactly (the detector reuses their KV cache) and the
needle's token span is known without searching. The insertion point `b` is a sentence boundary found from the
*text* (the character offsets of the tokens), never from hard-coded token ids: the Retrieval_Head reference
looked for Llama-2 period ids and put every needle at position 0 on other tokenizers.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass

from selective_attention.modeling import text_config
from selective_attention.retrieval.languages import Language, get_language
from selective_attention.retrieval.needles import Needle

logger = logging.getLogger(__name__)

CHARS_PER_TOKEN_GUESS = 6
_SENTINEL = "\u2063SA_CONTEXT\u2063"


class Haystack:
    """Token ids of a haystack text plus the token indices that start a new sentence."""

    def __init__(self, tokenizer, text: str, min_tokens: int = 0, language: str | Language = "en") -> None:
        """`language` (a code or `Language`): its sentence ends (e.g. Chinese 。！？ with no space after) and
        needle separator."""
        if not text.strip():
            raise ValueError("haystack text is empty")
        self.tokenizer = tokenizer
        self.language = get_language(language)
        budget = max(min_tokens, 1) * CHARS_PER_TOKEN_GUESS
        piece = text[:budget] if len(text) > budget else text
        ids, boundaries = self._tokenize(piece)
        while len(ids) < min_tokens:  # short corpus (or a bad guess): use more text, repeating it if needed
            piece = piece + "\n\n" + text if len(piece) >= len(text) else text
            ids, boundaries = self._tokenize(piece)
        self.text = piece
        self.ids: list[int] = ids
        self.boundaries: list[int] = boundaries

    def _tokenize(self, text: str) -> tuple[list[int], list[int]]:
        """Ids, and the indices of the tokens that start a sentence."""
        if getattr(self.tokenizer, "is_fast", False):
            encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            starts = [start for start, _ in encoded["offset_mapping"]]
            # byte pieces of one character share its offset: never split them
            return list(encoded["input_ids"]), [i for i, start in enumerate(starts) if i > 0 and start > starts[i - 1]
                                                and self.language.is_sentence_start(text, start)]
        # Slow tokenizers have no offsets: tokenize sentence by sentence, so boundaries are exact by construction.
        ids: list[int] = []
        boundaries: list[int] = []
        for sentence in self.language.split_sentences(text):
            if ids:
                boundaries.append(len(ids))
            ids += self.tokenizer(sentence, add_special_tokens=False)["input_ids"]
        return ids, boundaries

    def insertion_point(self, haystack_tokens: int, depth_percent: float) -> int:
        """Token index in the haystack where a needle at `depth_percent` goes: 0 and 100 exactly, otherwise the
        sentence boundary nearest below the requested depth (0 when there is none)."""
        if not 0 <= depth_percent <= 100:
            raise ValueError(f"depth {depth_percent} must lie in [0, 100]")
        if depth_percent >= 100:
            return haystack_tokens
        target = int(haystack_tokens * depth_percent / 100)
        found = bisect.bisect_right(self.boundaries, target) - 1
        return self.boundaries[found] if found >= 0 else 0


@dataclass
class PromptTemplate:
    """Token ids around the context: the chat template's header, and the question plus the assistant turn."""

    header_ids: list[int]
    tail_ids: list[int]
    chat: bool


def prompt_template(tokenizer, question: str, chat: bool | None = None,
                    language: str | Language = "en") -> PromptTemplate:
    """Chat template when the tokenizer has one (or `chat=True`), a plain prompt otherwise; `language` (code or
    `Language`) words the instruction in the question's language."""
    language = get_language(language)
    instruction, plain_header = language.instruction, language.header
    plain_tail = language.instruction + language.answer_cue
    use_chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
    if use_chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("chat=True but the tokenizer has no chat template")
        content = _SENTINEL + instruction.format(question=question)
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                 add_generation_prompt=True)
        header, tail = rendered.split(_SENTINEL)
        encode = lambda text: list(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
        return PromptTemplate(encode(header), encode(tail), True)
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    prefix = list(with_special[: len(with_special) - len(without)]) if with_special[-len(without):] == without else []
    header = prefix + list(tokenizer(plain_header, add_special_tokens=False)["input_ids"])
    tail = list(tokenizer(plain_tail.format(question=question), add_special_tokens=False)["input_ids"])
    return PromptTemplate(header, tail, False)


@dataclass
class NeedlePrompt:
    """One test point: prompt ids and where the needle sits in them."""

    input_ids: list[int]
    needle_span: tuple[int, int]  # [start, end) in input_ids
    context_length: int  # haystack + needle tokens
    depth_percent: float  # requested
    actual_depth: float  # insertion point / haystack tokens x 100
    needle: Needle
    prefix_length: int  # tokens shared with every other prompt on this haystack (header + haystack[:insert])
    header_length: int = 0  # template tokens before the haystack (chat header, BOS)
    requested_length: int = 0  # the grid's context length (`context_length` may differ by a token or two)


def needle_ids(tokenizer, needle: Needle, at_start: bool, separator: str = " ") -> list[int]:
    """`separator` goes between the haystack and the needle (none in Chinese text)."""
    text = needle.needle + "\n\n" if at_start else separator + needle.needle  # at the start: separate it from the haystack
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def build_prompt(haystack: Haystack, template: PromptTemplate, needle: Needle, context_length: int,
                 depth_percent: float) -> NeedlePrompt:
    """Prompt with `needle` hidden at `depth_percent` of a context of `context_length` tokens."""
    tokenizer = haystack.tokenizer
    separator = haystack.language.separator if getattr(haystack, "language", None) is not None else " "
    probe = needle_ids(tokenizer, needle, at_start=False, separator=separator)
    haystack_tokens = context_length - len(probe)
    if haystack_tokens < 1:
        raise ValueError(f"context length {context_length} leaves no room for the haystack (needle has {len(probe)} tokens)")
    if haystack_tokens > len(haystack.ids):
        raise ValueError(f"context length {context_length} exceeds the haystack ({len(haystack.ids)} tokens); "
                         "build the Haystack with min_tokens >= the longest context")
    insert = haystack.insertion_point(haystack_tokens, depth_percent)
    hidden = needle_ids(tokenizer, needle, at_start=insert == 0, separator=separator)
    haystack_tokens = context_length - len(hidden)  # one token more at the start with some tokenizers
    context = haystack.ids[:insert] + hidden + haystack.ids[insert:haystack_tokens]
    start = len(template.header_ids) + insert
    input_ids = template.header_ids + context + template.tail_ids
    return NeedlePrompt(
        input_ids=input_ids,
        needle_span=(start, start + len(hidden)),
        context_length=len(context),
        depth_percent=float(depth_percent),
        actual_depth=round(100.0 * insert / max(haystack_tokens, 1), 2),
        needle=needle,
        prefix_length=start,
        header_length=len(template.header_ids),
        requested_length=int(context_length),
    )


def max_context(model) -> int | None:
    """The model's maximum number of positions, if the config says."""
    return getattr(text_config(model), "max_position_embeddings", None)


def check_grid(lengths, depths, needles) -> tuple[list[int], list[float]]:
    """Validate a needle grid; returns the sorted, de-duplicated context lengths and depths (percent)."""
    if not lengths or any(int(n) < 1 for n in lengths):
        raise ValueError(f"context lengths must be positive integers, got {lengths}")
    if not depths or any(not 0 <= float(d) <= 100 for d in depths):
        raise ValueError(f"depths must lie in [0, 100], got {depths}")
    if not needles:
        raise ValueError("at least one needle is needed")
    return sorted({int(n) for n in lengths}), sorted({float(d) for d in depths})


def check_length(model, prompt_tokens: int, max_new_tokens: int, context_length: int) -> None:
    limit = max_context(model)
    if limit is not None and prompt_tokens + max_new_tokens > limit:
        raise ValueError(f"context length {context_length} needs {prompt_tokens} prompt + {max_new_tokens} new tokens, "
                         f"above the model's maximum of {limit} positions")

"""`selective-attention demo`: a needle question on the embedded model, answered unmasked and with heads masked.

The 30-second tour: a ~1K-token Paul Graham haystack with the San Francisco needle in the middle, answered once
as is, then with the model's top retrieval heads masked (from `--head-scores`, or the scores shipped for the
embedded model), then with as many seeded random heads masked.

How many heads: `--num-heads K`, by default a share of the model's query heads, `DEFAULT_HEAD_SHARE` (7.5%) of
layers x heads rounded, at least 1: 20 of SmolLM2's 270, 5 of Gemma 3 270M's 72. A model without head scores (none
shipped for it, no `--head-scores`) cannot have its top heads masked; the demo says so (a warning and a line in
the printed result) and runs only the random-heads comparison.
"""

from __future__ import annotations

import argparse
import logging
import time

from selective_attention.attention.masked import MASK_MODES
from selective_attention.cache import attach_headwise, headwise_policy, kv_budget
from selective_attention.cache.headwise import parse_full, trial_cache
from selective_attention.cli.arguments import add_config_arguments, add_model_arguments
from selective_attention.heads.masking import mask_heads
from selective_attention.heads.scores import headwise_scores_path, model_head_scores
from selective_attention.heads.selection import select_heads
from selective_attention.loading.loader import load_model
from selective_attention.modeling import text_config
from selective_attention.retrieval.config import KV_CACHE_FIELDS, NeedleConfig
from selective_attention.retrieval.generate import greedy_decode, stop_token_ids
from selective_attention.retrieval.haystack import Haystack, build_prompt, check_length, prompt_template
from selective_attention.retrieval.languages import get_language
from selective_attention.retrieval.needles import resolve_needles

logger = logging.getLogger(__name__)

#: Share of a model's query heads masked when `--heads` is not given (20 of SmolLM2-135M's 270).
DEFAULT_HEAD_SHARE = 0.075


def default_head_count(total_heads: int, share: float = DEFAULT_HEAD_SHARE) -> int:
    """`share` of `total_heads`, rounded, at least 1."""
    return max(1, round(share * total_heads))


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="answer a needle question with and without masked heads")
    add_model_arguments(parser)
    parser.add_argument("--context-tokens", type=int, default=1000)
    parser.add_argument("--depth", type=float, default=50.0, help="needle depth in percent")
    parser.add_argument("--needle", default="sf", help="built-in needle name or a JSONL file (first needle)")
    parser.add_argument("--num-heads", type=int, default=None,
                        help=f"how many heads to mask (default: {DEFAULT_HEAD_SHARE * 100:.1f}%% of the model's query heads, "
                             "rounded, at least 1: 20 on SmolLM2-135M, 5 on Gemma 3 270M)")
    parser.add_argument("--head-scores", default=None,
                        help="head_scores.json for this model (default: the shipped scores of the embedded model)")
    parser.add_argument("--heads", dest="num_heads", type=int, help=argparse.SUPPRESS)  # old spelling, one release
    parser.add_argument("--mask-mode", default="zero", choices=MASK_MODES, help="how masked heads are ablated")
    parser.add_argument("--mode", dest="mask_mode", choices=MASK_MODES, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    add_config_arguments(parser, NeedleConfig, only=KV_CACHE_FIELDS)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.num_heads is not None and args.num_heads < 1:
        raise ValueError(f"--num-heads {args.num_heads}: must be at least 1")
    started = time.perf_counter()
    needle = resolve_needles(args.needle)[0]
    model, tokenizer = load_model(args.model, dtype=args.dtype, attn_implementation=args.attn, device=args.device)
    config = text_config(model)
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    count = default_head_count(layers * heads) if args.num_heads is None else args.num_heads
    if not 1 <= count <= layers * heads:
        raise ValueError(f"--num-heads {count}: this model has {layers * heads} query heads ({layers} x {heads})")
    scores, source = model_head_scores(args.head_scores, args.model, layers, heads)
    if scores is None:
        logger.warning("no head scores for %s (none shipped, no --head-scores): the top-heads run is skipped; make "
                       "them with `selective-attention detect` and pass --head-scores", args.model)

    english = get_language("en")  # the same sentence and scoring rules as `detect` and `needle` in English
    haystack = Haystack(tokenizer, english.haystack_text(), min_tokens=args.context_tokens, language=english)
    prompt = build_prompt(haystack, prompt_template(tokenizer, needle.question, language=english), needle,
                          args.context_tokens, args.depth)
    check_length(model, len(prompt.input_ids), args.max_new_tokens, args.context_tokens)
    stop_ids = stop_token_ids(tokenizer, model)
    policy = headwise_demo_policy(args, model, scores, len(prompt.input_ids))

    def answer() -> str:
        cache, cached = (None, 0) if policy is None else trial_cache(model, policy, None, 0, prompt.input_ids,
                                                                      args.prefill_chunk)
        decoded = greedy_decode(model, prompt.input_ids, stop_ids=stop_ids, max_new_tokens=args.max_new_tokens,
                                cache=cache, cached_length=cached)
        return tokenizer.decode(decoded.tokens, skip_special_tokens=True).strip()

    def show(label: str, text: str) -> None:
        recall = 100 * english.rouge1_recall(needle.needle, text)
        print(f"{label}\n    {text!r}  (ROUGE-1 recall of the needle: {recall:.0f})")

    print(f"{len(prompt.input_ids)}-token prompt, needle at {prompt.actual_depth:.0f}% depth: {needle.needle!r}")
    print(f"question: {needle.question}")
    show("unmasked:", answer())
    runs = []
    if scores is not None:
        runs.append((f"top {count} retrieval heads masked ({args.mask_mode}; {source})", "top"))
    else:
        print(f"top {count} retrieval heads masked: skipped, no head scores for this model (none shipped, no "
              "--head-scores; make them with `selective-attention detect`)")
    runs.append((f"{count} random heads masked ({args.mask_mode}, seed {args.seed}"
                 + (", none of the top heads)" if scores is not None else ")"), "random"))
    every = {f"{l}-{h}": [0.0] for l in range(layers) for h in range(heads)}
    for label, kind in runs:
        chosen = select_heads(scores if scores is not None else every, f"{kind}:{count}", seed=args.seed,
                              num_layers=layers, num_heads=heads)
        with mask_heads(model, chosen, mode=args.mask_mode):
            show(label + ":", answer())
        logger.info("masked %s", ",".join(f"{l}-{h}" for l, h in chosen))
    logger.info("demo took %.1fs", time.perf_counter() - started)
    return 0


def headwise_demo_policy(args: argparse.Namespace, model, scores, prompt_tokens: int):
    """With --kv-cache headwise: the policy every answer of the demo decodes under (the model switched to it)."""
    if args.kv_cache != "headwise":
        return None

    kv_scores = headwise_scores_path(args.head_scores, args.model) or scores
    policy = headwise_policy(model, kv_scores, full=parse_full(args.full_kv_heads), sink=args.sink, window=args.window,
                             method=args.kv_select, seed=args.seed)
    attach_headwise(model, policy)
    budget = kv_budget(model, policy, prompt_tokens)
    print(f"head-wise KV cache: {policy.describe()} ({args.kv_select}); {budget.fraction:.0%} of the dense KV "
          f"positions kept at {prompt_tokens} tokens")
    return policy

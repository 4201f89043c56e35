"""`selective-attention demo`: a needle question on the embedded model, answered with and without masked heads."""

from __future__ import annotations

import argparse
import logging
import random
import time

import torch

from .. import assets
from ..loading import load_model
from ..masking import mask_heads, text_config
from . import add_model_arguments

logger = logging.getLogger(__name__)

NEEDLE = "\nThe best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.\n"
QUESTION = "What is the best thing to do in San Francisco?"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="answer a needle question with and without masked heads")
    add_model_arguments(parser)
    parser.add_argument("--context-tokens", type=int, default=1000)
    parser.add_argument("--heads", type=int, default=20, help="number of seeded-random heads to mask")
    parser.add_argument("--mode", default="uniform", choices=["zero", "uniform", "mean"])
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run)


def build_prompt(tokenizer, context_tokens: int) -> str:
    essays = sorted(assets.haystack_dir().glob("*.txt"))
    text = "".join(path.read_text(encoding="utf-8") for path in essays[:6])
    ids = tokenizer(text, add_special_tokens=False).input_ids[:context_tokens]
    context = tokenizer.decode(ids)
    cut = context.rfind(". ", 0, len(context) // 2) + 1
    context = context[:cut] + NEEDLE + context[cut:]
    messages = [{"role": "user", "content": f"{context}\n\nBased on the text above, {QUESTION} Answer briefly."}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def answer(model, tokenizer, prompt: str, max_new_tokens: int = 32) -> str:
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(output[0, inputs.input_ids.shape[1]:], skip_special_tokens=True).strip()


def run(args: argparse.Namespace) -> int:
    model, tokenizer = load_model(args.model, dtype=args.dtype, attn_implementation=args.attn, device=args.device)
    prompt = build_prompt(tokenizer, args.context_tokens)
    config = text_config(model)
    every_head = [(l, h) for l in range(config.num_hidden_layers) for h in range(config.num_attention_heads)]
    heads = random.Random(args.seed).sample(every_head, args.heads)
    start = time.perf_counter()
    print(f"question: {QUESTION}")
    print(f"unmasked answer: {answer(model, tokenizer, prompt)}")
    with mask_heads(model, heads, mode=args.mode):
        print(f"{len(heads)} random heads masked ({args.mode}): {answer(model, tokenizer, prompt)}")
    logger.info("demo took %.1fs", time.perf_counter() - start)
    return 0

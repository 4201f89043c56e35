"""`selective-attention attention-map`: attention heatmaps, before and after an intervention."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from safetensors.torch import save_file

from selective_attention.attention.maps import attention_maps
from selective_attention.cli.arguments import add_model_arguments, add_output_argument
from selective_attention.heads.masking import mask_heads
from selective_attention.heads.scores import model_head_scores
from selective_attention.heads.selection import select_heads
from selective_attention.loading.loader import load_model
from selective_attention.modeling import text_config
from selective_attention.plots import plot_average, plot_head_across_layers, plot_layer, plot_map_comparison
from selective_attention.tree_kernel import TreeKernelConfig, configure_tree_kernel

logger = logging.getLogger(__name__)
DEFAULT_TEXT = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("attention-map", help="attention heatmaps (per layer, per head, averaged, before/after)")
    add_model_arguments(parser)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--text", default=None, help=f"text to read (default: {DEFAULT_TEXT!r})")
    source.add_argument("--text-file", type=Path, default=None)
    parser.add_argument("--chat", action="store_true", help="wrap the text in the model's chat template")
    parser.add_argument("--layers", default=None, help="comma-separated layers (default: first, middle, last)")
    parser.add_argument("--heads", default=None, help="comma-separated heads for the per-layer grids (default: all)")
    parser.add_argument("--head", type=int, default=0, help="head drawn across layers and in the comparison")
    parser.add_argument("--mask", default=None, help="intervention: heads to mask, 'L-H,...' or top:K/bottom:K/random:K")
    parser.add_argument("--head-scores", type=Path, default=None,
                        help="head-score JSON for top:/bottom:/random: (default for the embedded model: its shipped "
                             "scores)")
    parser.add_argument("--mask-mode", default="zero", choices=["zero", "uniform", "mean"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare-model", default=None, help="intervention: a second model (e.g. a GQA conversion)")
    parser.add_argument("--tree-kernel", default=None, metavar="METHOD",
                        help="intervention: tree-kernel attention (bound, topk, alignment, favor+, ...) in every layer; "
                             "maps show the exact weights of the queries/keys the approximated model computes")
    parser.add_argument("--tree-fraction", type=float, default=None, help="tree kernel: fraction of keys kept")
    parser.add_argument("--tree-exponent", type=float, default=None, help="tree kernel: seed methods' E (l^E buds)")
    parser.add_argument("--adapter", default=None, help="intervention: a PEFT adapter loaded on top of --model")
    add_output_argument(parser, "folder for the PNGs, maps.safetensors and tokens.json", default=Path("attention_maps"))
    parser.set_defaults(func=run)


def _ints(text: str | None) -> list[int] | None:
    return None if text is None else [int(part) for part in text.split(",") if part.strip()]


def run(args: argparse.Namespace) -> int:
    text = args.text_file.read_text(encoding="utf-8") if args.text_file else (args.text or DEFAULT_TEXT)
    model, tokenizer = load_model(args.model, dtype=args.dtype, attn_implementation=args.attn, device=args.device)
    config = text_config(model)
    layers = _ints(args.layers) or sorted({0, config.num_hidden_layers // 2, config.num_hidden_layers - 1})
    if not 0 <= args.head < config.num_attention_heads:
        raise ValueError(f"--head {args.head} out of range: the model has {config.num_attention_heads} heads")
    if any(not 0 <= layer < config.num_hidden_layers for layer in layers):
        raise ValueError(f"--layers {layers} out of range: the model has {config.num_hidden_layers} layers")
    heads = None
    if args.mask:  # resolved before any work, so a bad spec or score file costs nothing
        scores, _ = model_head_scores(args.head_scores, args.model, config.num_hidden_layers,
                                      config.num_attention_heads)
        heads = select_heads(scores, args.mask, seed=args.seed, num_layers=config.num_hidden_layers,
                             num_heads=config.num_attention_heads)
    tree = None
    if args.tree_kernel:  # a bad method or budget is refused before any work
        tree = TreeKernelConfig(method=args.tree_kernel, fraction=args.tree_fraction, exponent=args.tree_exponent)
    before, tokens = attention_maps(model, tokenizer, text, layers, chat=args.chat)
    written = _draw_all(before, tokens, layers, _ints(args.heads), args.head, args.output, "")

    after, label = None, None
    if heads is not None:
        label = f"masked {len(heads)} heads ({args.mask_mode})"
        with mask_heads(model, heads, mode=args.mask_mode):
            after, _ = attention_maps(model, tokenizer, text, layers, chat=args.chat)
    elif args.adapter:
        from peft import PeftModel

        adapted = PeftModel.from_pretrained(model, args.adapter).eval()
        after, _ = attention_maps(adapted.base_model.model, tokenizer, text, layers, chat=args.chat)
        label = f"adapter {Path(args.adapter).name}"
    elif tree is not None:
        configure_tree_kernel(model, tree)
        try:
            after, _ = attention_maps(model, tokenizer, text, layers, chat=args.chat)
        finally:
            configure_tree_kernel(model, None)
        label = f"tree kernel {args.tree_kernel}"
    elif args.compare_model:
        other, _ = load_model(args.compare_model, dtype=args.dtype, attn_implementation=args.attn, device=args.device,
                              trust_remote_code=True)
        after, _ = attention_maps(other, tokenizer, text, layers, chat=args.chat)
        label = Path(str(args.compare_model)).name
    if after is not None:
        written += _draw_all(after, tokens, layers, _ints(args.heads), args.head, args.output / "after", f"({label})")
        for layer in layers:
            written.append(plot_map_comparison(before, after, tokens, layer, args.head,
                                           args.output / f"compare_layer{layer}_head{args.head}.png", ("before", label)))

    tensors = {f"before.layer{layer}": before[layer].contiguous() for layer in layers}
    if after is not None:
        tensors.update({f"after.layer{layer}": after[layer].contiguous() for layer in layers})
    save_file(tensors, str(args.output / "maps.safetensors"))
    (args.output / "tokens.json").write_text(json.dumps({"tokens": tokens, "intervention": label}, indent=1))
    for path in written:
        print(path)
    return 0


def _draw_all(maps, tokens, layers, heads, head, out: Path, label: str) -> list[Path]:
    paths = [plot_layer(maps, tokens, layer, out / f"layer{layer}.png", heads, label) for layer in layers]
    paths.append(plot_head_across_layers(maps, tokens, head, out / f"head{head}_across_layers.png", label))
    paths.append(plot_average(maps, tokens, out / "average.png", label))
    return paths

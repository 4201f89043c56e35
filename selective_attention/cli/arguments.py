"""Flags shared by the subcommands: `--output` (with its hidden aliases), the model-loading flags, and the flags
derived from a task's config dataclass (`add_config_arguments`, read back by `config_from_args`)."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path

from selective_attention.distributed.placement import check_placement, parse_device_map, parse_max_memory
from selective_attention.distributed.sharding import place
from selective_attention.loading.loader import resolve_dtype


def add_output_argument(parser: argparse.ArgumentParser, help: str, default=None, type=Path) -> None:
    """`--output`, the one spelling of "where results go" in every command; `--out` and `--output-dir` stay as
    hidden aliases for one release."""
    parser.add_argument("--output", type=type, default=default, help=help + (" (required)" if default is None else ""))
    for alias in ("--out", "--output-dir"):
        parser.add_argument(alias, dest="output", type=type, help=argparse.SUPPRESS)
    parser.set_defaults(output_required=default is None)  # checked by `cli.main`: any spelling satisfies it


def add_model_arguments(parser: argparse.ArgumentParser, placement: bool = False) -> None:
    """--model/--dtype/--attn/--device, shared by every command that loads a model; with `placement` also
    --device-map/--max-memory/--offload-folder (big-model inference), read back by `model_kwargs`."""
    parser.add_argument("--model", default=None, help="HF model id, local dir or .gguf file (default: embedded SmolLM2)")
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 | auto")
    parser.add_argument("--attn", default="sdpa", help="base attention implementation: sdpa | eager | flash_attention_2")
    parser.add_argument("--device", default=None, help="e.g. cuda, cpu (default: where transformers puts it)")
    if placement:
        parser.add_argument("--device-map", default=None,
                            help="split the model over devices: auto | balanced | balanced_low_0 | sequential, "
                                 "a JSON object {\"model.layers.0\": 0, ...} or a JSON file (accelerate "
                                 "big-model inference)")
        parser.add_argument("--max-memory", default=None,
                            help="memory per device for --device-map, e.g. '0=70GiB,1=70GiB,cpu=200GiB'")
        parser.add_argument("--offload-folder", default=None,
                            help="folder for weights the device map puts on disk")


def model_kwargs(args: argparse.Namespace, shard=None) -> dict:
    """Keyword arguments of `selective_attention.loading.loader.load_model` from the model arguments; checked before any
    loading. `shard` (a `selective_attention.distributed.sharding.Shard`) gives each process of a sharded run its own GPU(s)."""

    resolve_dtype(args.dtype)
    device_map = parse_device_map(getattr(args, "device_map", None))
    max_memory = parse_max_memory(getattr(args, "max_memory", None))
    offload_folder = getattr(args, "offload_folder", None)
    check_placement(args.device, device_map, max_memory, offload_folder)
    placed = {"device": args.device, "device_map": device_map, "max_memory": max_memory}
    if shard is not None:
        placed = place(shard, **placed)
    return dict(model=args.model, dtype=args.dtype, attn_implementation=args.attn, offload_folder=offload_folder,
                quantize=getattr(args, "quantize", None), **placed)


def _flag_type(hint) -> tuple[type, bool]:
    """(element type, is a list) of a field annotation: `int`, `int | None`, `list[float]`, `list[str] | None`."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return _flag_type(args[0])
    if typing.get_origin(hint) is list:
        return args[0], True
    return hint, False


def add_config_arguments(parser: argparse.ArgumentParser, config_class: type, skip: tuple[str, ...] = ()) -> None:
    """One flag per field of a config dataclass: `--dense-layers` for `dense_layers`, the field's default, and its
    `metadata` "help", "choices" and hidden "aliases" (old spellings); lists take one or more values."""
    hints = typing.get_type_hints(config_class)
    for spec in dataclasses.fields(config_class):
        if spec.name in skip:
            continue
        kind, many = _flag_type(hints[spec.name])
        default = spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default
        choices = spec.metadata.get("choices")
        help = spec.metadata.get("help")
        options = dict(dest=spec.name, type=kind, nargs="+" if many else None, choices=choices)
        if choices and len(", ".join(map(str, choices))) > 30:  # a long list reads better in the help than in usage
            options["metavar"] = spec.name.upper()
            help = f"{help} (choices: %(choices)s)"
        if kind is bool:
            options = dict(dest=spec.name, action=argparse.BooleanOptionalAction)
        parser.add_argument("--" + spec.name.replace("_", "-"), default=default, help=help, **options)
        for alias in spec.metadata.get("aliases", ()):
            parser.add_argument(alias, help=argparse.SUPPRESS, **options)


def config_from_args(config_class: type, args: argparse.Namespace, **values):
    """The config dataclass from parsed flags (`add_config_arguments`), with `values` taking precedence."""
    names = {spec.name for spec in dataclasses.fields(config_class)}
    return config_class(**{**{name: getattr(args, name) for name in names if hasattr(args, name)}, **values})

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


def add_config_arguments(parser: argparse.ArgumentParser, config_class: type, skip: tuple[str, ...] = (),
                         only: tuple[str, ...] | None = None) -> None:
    """One flag per field of a config dataclass (all, or `only` these, less `skip`): `--dense-layers` for
    `dense_layers`, with the field's default and type (lists take one or more values). A field's `metadata` may add
    "help" (text, or a function called now), "choices", hidden "aliases" (old spellings), "type" (a parser of the
    flag's text, e.g. "0:100:25" -> a list), "cli_default" (text given to that parser where the field has no
    default), and "flag" + "const" (a switch storing `const`, e.g. `--no-chat` -> chat=False)."""
    hints = typing.get_type_hints(config_class)
    for spec in dataclasses.fields(config_class):
        if spec.name in skip or (only is not None and spec.name not in only):
            continue
        meta = spec.metadata
        kind, many = _flag_type(hints[spec.name])
        if spec.default_factory is not dataclasses.MISSING:
            default = spec.default_factory()
        elif spec.default is not dataclasses.MISSING:
            default = spec.default
        else:
            default = meta["type"](meta["cli_default"]) if "cli_default" in meta else None
        help = meta.get("help")
        help = help() if callable(help) else help
        flag = meta.get("flag", "--" + spec.name.replace("_", "-"))
        if "const" in meta:
            options = dict(dest=spec.name, action="store_const", const=meta["const"])
        elif kind is bool:
            options = dict(dest=spec.name, action="store_true")
        elif "type" in meta:
            options = dict(dest=spec.name, type=meta["type"])
        else:
            options = dict(dest=spec.name, type=kind, nargs="+" if many else None, choices=meta.get("choices"))
            if options["choices"] and len(", ".join(map(str, options["choices"]))) > 30:
                options["metavar"] = spec.name.upper()  # a long list reads better in the help than in the usage
                help = f"{help} (choices: %(choices)s)"
        parser.add_argument(flag, default=default, help=help, **options)
        for alias in meta.get("aliases", ()):
            parser.add_argument(alias, help=argparse.SUPPRESS, **options)


def config_from_args(config_class: type, args: argparse.Namespace, **values):
    """The config dataclass from parsed flags (`add_config_arguments`), with `values` taking precedence."""
    names = {spec.name for spec in dataclasses.fields(config_class)}
    return config_class(**{**{name: getattr(args, name) for name in names if hasattr(args, name)}, **values})

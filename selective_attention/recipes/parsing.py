"""One way to read a recipe's dataclasses: YAML file, Python values and command-line flags, via `HfArgumentParser`.

A recipe is a tuple of dataclasses (ours for what transformers and peft lack, plus `TrainingArguments` where it
trains). Its YAML file is flat: every key is a field of one of them, exactly the name of the command-line flag
(`num_train_epochs: 3` <-> `--num_train_epochs 3`). Whatever the source, the merged values go through
`HfArgumentParser.parse_dict(allow_extra_keys=False)`, so YAML, Python and CLI are validated the same way; an
unknown key is named before any dataclass is built, with the closest known key as a hint.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

#: Every recipe writes into `output_dir`: required where its dataclass leaves it None (TrainingArguments does).
REQUIRED_KEYS = ("output_dir",)


class YamlMapping(dict):
    """A mapping field: a dict from YAML or Python, YAML text on the command line (`--lora '{r: 4}'`)."""

    def __init__(self, value: str | dict | None = None) -> None:
        loaded = yaml.safe_load(value) if isinstance(value, str) else ({} if value is None else value)
        if not isinstance(loaded, dict):
            raise ValueError(f"expected a mapping such as '{{r: 8, lora_alpha: 16}}', got {value!r}")
        super().__init__(loaded)


class CheckedArguments:
    """`__post_init__` that enforces each field's `metadata["choices"]` for YAML and Python values too (argparse
    only checks the command line)."""

    def __post_init__(self) -> None:
        for spec in dataclasses.fields(self):  # type: ignore[arg-type]
            choices = spec.metadata.get("choices")
            value = getattr(self, spec.name)
            values = value if isinstance(value, list) else [value]
            bad = [item for item in values if choices is not None and item is not None and item not in choices]
            if bad:
                raise ValueError(f"unknown {spec.name} {bad[0]!r}; expected one of {', '.join(map(str, choices))}")


def borrowed_field(config: type, name: str, **default: Any) -> Any:
    """A recipe field declared by a task config: its help text and choices come from `config`'s field `name`
    (e.g. `NeedleConfig.score_against`), so the recipe, the CLI flag and the library share one declaration.
    `default=` / `default_factory=` set the recipe's own default (else the config's)."""
    source = {spec.name: spec for spec in dataclasses.fields(config)}[name]
    text = source.metadata.get("help", "")
    metadata: dict[str, Any] = {"help": text() if callable(text) else text}
    if "choices" in source.metadata:
        metadata["choices"] = tuple(source.metadata["choices"])
    if not default:
        default = {"default": source.default} if source.default is not dataclasses.MISSING else {}
    return dataclasses.field(metadata=metadata, **default)


def _field_names(types: Sequence[type]) -> dict[str, dataclasses.Field]:
    return {spec.name: spec for cls in types for spec in dataclasses.fields(cls) if spec.init}


def read_config(path: str | Path, types: Sequence[type]) -> dict[str, Any]:
    """A flat YAML mapping; fields listed in a dataclass's `config_relative_paths` resolve against the file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist")
    values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a mapping of keys to values")
    relative = {name for cls in types for name in getattr(cls, "config_relative_paths", ())}
    for name in relative & set(values):
        if values[name] and not os.path.isabs(values[name]):
            values[name] = str((path.resolve().parent / values[name]).resolve())
    return values


def check_keys(values: dict[str, Any], types: Sequence[type]) -> None:
    """Unknown keys (named, with the nearest known one) and missing required ones are a ValueError."""
    known = _field_names(types)
    unknown = sorted(set(values) - set(known))
    if unknown:
        hints = [f"{key} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(key, known, 1)) else key
                 for key in unknown]
        owners = ", ".join(cls.__name__ for cls in types)
        raise ValueError(f"unknown config key(s) {', '.join(hints)}; known keys are the fields of {owners} "
                         f"(see --help)")
    required = [name for name, spec in known.items() if spec.default is dataclasses.MISSING
                and spec.default_factory is dataclasses.MISSING]
    required += [name for name in REQUIRED_KEYS if name in known and known[name].default is None]
    missing = [name for name in dict.fromkeys(required) if values.get(name) is None]
    if missing:
        raise ValueError(f"config lacks required key(s) {', '.join(missing)}")


def merge(base: dict[str, Any], updates: dict[str, Any]) -> dict[str, Any]:
    """`updates` over `base`; a mapping value (e.g. `lora`) is updated key by key, not replaced."""
    merged = dict(base)
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def parse_config(types: Sequence[type], config: str | Path | None = None, *,
                 values: dict[str, Any] | None = None) -> tuple:
    """Instances of `types` from a YAML file and/or `values` (which win), in the order of `types`."""
    merged = read_config(config, types) if config is not None else {}
    merged = merge(merged, values or {})
    check_keys(merged, types)
    return HfArgumentParser(list(types)).parse_dict(merged, allow_extra_keys=False)


def command_line(types: Sequence[type], argv: Sequence[str] | None = None, description: str | None = None
                 ) -> tuple[tuple, argparse.Namespace]:
    """`--config FILE.yaml` plus one flag per field (derived by HfArgumentParser) that overrides the file.

    Returns the dataclasses and the script's own options (`config`, `overwrite`).
    """
    parser = HfArgumentParser(list(types), description=description,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    fields = _field_names(types)
    for action in parser._actions:
        if action.dest in fields:  # only flags actually given reach the merge; the help still shows the default
            shown = action.default not in (None, {}) and not isinstance(action, argparse._StoreFalseAction)
            if shown and action.help not in (None, argparse.SUPPRESS):
                action.help += f" (default: {action.default})"
            action.default, action.required = argparse.SUPPRESS, False
    options = parser.add_argument_group("recipe")
    options.add_argument("--config", default=None, help="YAML file of these keys; flags given here override it")
    options.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    namespace = vars(parser.parse_args(argv))
    script = argparse.Namespace(**{key: namespace.pop(key) for key in ("config", "overwrite")})
    return parse_config(types, script.config, values=namespace), script


def settings(*arguments: Any) -> dict[str, Any]:
    """The parsed dataclasses as one flat dict, the shape of a config file (written as run_config.json)."""
    flat: dict[str, Any] = {}
    for item in arguments:
        flat.update(item.to_dict() if hasattr(item, "to_dict") else dataclasses.asdict(item))
    return flat

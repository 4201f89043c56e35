"""Needles: a sentence to hide, the question that retrieves it, and the expected answer.

The built-in set lives in `selective_attention/data/needles.json` (the classic San Francisco needle plus needles
written for this project); users add their own as JSONL lines `{"needle": ..., "question": ..., "answer": ...}`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

REQUIRED_FIELDS = ("needle", "question", "answer")


@dataclass(frozen=True)
class Needle:
    """One needle; `name` keys its trials in result files (derived from the text when not given)."""

    needle: str
    question: str
    answer: str
    name: str = ""

    def __post_init__(self) -> None:
        for field_name in REQUIRED_FIELDS:
            value = getattr(self, field_name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"needle field {field_name!r} must be a non-empty string, got {value!r}")
        object.__setattr__(self, "needle", " ".join(self.needle.split()))
        if not self.name:
            digest = hashlib.sha1(f"{self.needle}\n{self.question}".encode()).hexdigest()[:10]
            object.__setattr__(self, "name", f"n{digest}")

    def to_dict(self) -> dict:
        return {"name": self.name, "needle": self.needle, "question": self.question, "answer": self.answer}


def _from_record(record: object, where: str) -> Needle:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object with fields {', '.join(REQUIRED_FIELDS)}")
    missing = [name for name in REQUIRED_FIELDS if name not in record]
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(missing)} (need {', '.join(REQUIRED_FIELDS)})")
    unknown = set(record) - {*REQUIRED_FIELDS, "name"}
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    try:
        return Needle(record["needle"], record["question"], record["answer"], str(record.get("name") or ""))
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


def builtin_needles() -> list[Needle]:
    text = resources.files("selective_attention").joinpath("data/needles.json").read_text(encoding="utf-8")
    return [_from_record(item, f"built-in needle {i}") for i, item in enumerate(json.loads(text))]


def load_needles(path: str | Path) -> list[Needle]:
    """Needles from a JSONL file (one object per line; blank lines ignored), validated line by line."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"needle file {path} does not exist")
    needles = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not valid JSON ({error})") from None
        needles.append(_from_record(record, f"{path}:{number}"))
    if not needles:
        raise ValueError(f"needle file {path} holds no needles")
    names = [n.name for n in needles]
    if len(set(names)) != len(names):
        raise ValueError(f"needle file {path}: needle names must be unique")
    return needles


def resolve_needles(spec: str | None, builtin: list[Needle] | None = None, label: str = "") -> list[Needle]:
    """None (the first built-in needle: "sf"), "all", built-in names "sf,violin", or a JSONL path.

    `builtin` replaces the English set (a language's own needles); `label` names that set in errors.
    """
    known = {n.name: n for n in (builtin if builtin is not None else builtin_needles())}
    if not spec:
        return [next(iter(known.values()))]
    if spec == "all":
        return list(known.values())
    if spec.endswith(".jsonl") or Path(spec).exists():
        return load_needles(spec)
    names = [part.strip() for part in spec.split(",") if part.strip()]
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"unknown {label + ' ' if label else ''}needle(s) {', '.join(unknown)}; built-in: "
                         f"{', '.join(known)} (or a .jsonl file)")
    return [known[name] for name in names]

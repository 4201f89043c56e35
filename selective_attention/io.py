"""Atomic writes: a file is either the old version or the complete new one, never half written.

One convention everywhere: write `<name>.partial` beside the target, then `os.replace` it over the target (atomic
on POSIX and Windows within one filesystem). An interrupted run leaves at most a stray `.partial`, which the next
write replaces.

Resumable runs read their JSON back through `load_resumable`, which refuses a file written under other settings.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

PARTIAL_SUFFIX = ".partial"


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields the temporary path to write; on success it replaces `path` (parents created), on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    try:
        yield partial
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as partial:
        partial.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, data: Any, indent: int | None = 2) -> Path:
    """JSON (UTF-8, non-ASCII kept, trailing newline); NaN is refused, as it is not JSON."""
    return write_text(path, json.dumps(data, indent=indent, ensure_ascii=False, allow_nan=False) + "\n")


def load_resumable(path: str | Path, settings: dict[str, Any]) -> dict[str, Any]:
    """What an earlier run with the same `settings` left in the JSON file `path` ({} when there is no file).

    A file written under other settings is refused (ValueError naming what differs) rather than started over: it
    may hold hours of finished work. The check needs no model, so a command can make it before any work.
    """
    path = Path(path)
    if not path.exists():
        return {}
    saved = json.loads(path.read_text(encoding="utf-8"))
    theirs = saved.get("settings") or {}
    ours = json.loads(json.dumps(settings))  # tuples -> lists, as they were saved
    if theirs != ours:
        differing = ", ".join(f"{key}: {theirs.get(key)!r} there, {ours.get(key)!r} here"
                              for key in sorted(set(theirs) | set(ours)) if theirs.get(key) != ours.get(key))
        raise ValueError(f"{path} holds a run with other settings ({differing}); pass another --output, or move the "
                         "file away to start over")
    return saved

"""Haystack text: the embedded Paul Graham essays, a folder of .txt files, one file, or a `datasets` dataset."""

from __future__ import annotations

from pathlib import Path

from selective_attention.loading import assets


def load_haystack_text(source: str | Path | None = None) -> str:
    """Text of the haystack: None (the embedded Paul Graham essays), a folder of .txt files, one text file, or
    `dataset:NAME[:SPLIT[:COLUMN]]` (a `datasets` dataset; default split train, column text)."""
    if source is not None and str(source).startswith("dataset:"):
        from datasets import load_dataset

        name, split, column = (str(source)[len("dataset:"):].split(":") + ["train", "text"])[:3]
        rows = load_dataset(name, split=split)
        if column not in rows.column_names:
            raise ValueError(f"dataset {name} has no column {column!r}; columns: {rows.column_names}")
        return "\n\n".join(str(text) for text in rows[column] if text)
    if source is None:
        source = assets.haystack_dir()
    path = Path(source)
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise FileNotFoundError(f"haystack folder {path} holds no .txt files")
        return "\n\n".join(f.read_text(encoding="utf-8", errors="replace").strip() for f in files)
    if path.is_file():
        return path.read_text(encoding="utf-8", errors="replace")
    raise FileNotFoundError(f"haystack {path} does not exist (expected a folder of .txt files, a file or dataset:NAME)")

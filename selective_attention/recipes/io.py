"""Output directories and result files for the recipes: refuse to clobber, write atomically (`..io`)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from selective_attention.io import write_text

#: Written first by every recipe run; marks a directory the recipes may replace with --overwrite.
RUN_MARKER = "run_config.json"


def prepare_output_dir(path: str | Path, overwrite: bool = False, *, main_process: bool = True) -> Path:
    """Create `path` for a new run; an existing non-empty one is refused unless `overwrite`.

    With `overwrite` a previous recipe run (it has `run_config.json`) is removed first; any other non-empty
    directory is still refused, so a mistyped path never deletes someone's files. No write access is a ValueError.
    """
    path = Path(path)
    if main_process:
        if path.exists() and not path.is_dir():
            raise ValueError(f"output dir {path} exists and is not a directory")
        if path.exists() and any(path.iterdir()):
            if not overwrite:
                raise ValueError(f"output dir {path} already exists and is not empty; pass --overwrite to replace it")
            if not (path / RUN_MARKER).exists():
                raise ValueError(f"output dir {path} is not empty and holds no {RUN_MARKER} (not a recipe run); "
                                 "refusing to delete it even with --overwrite")
            shutil.rmtree(path)
        try:
            path.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path):
                pass
        except OSError as error:
            raise ValueError(f"no write access to output dir {path}: {error}") from None
    return path


def write_json(path: str | Path, payload: object) -> Path:
    """JSON written atomically; values JSON lacks (paths, enums) as strings."""
    return write_text(path, json.dumps(payload, indent=2, default=str) + "\n")


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    return write_text(path, "".join(json.dumps(row, default=str) + "\n" for row in rows))

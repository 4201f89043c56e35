"""NLI examples for the recipes: local JSON/JSONL/CSV/TSV files with MNLI's fields, a hub dataset through `datasets`
(needs the network or a warm cache), the bundled sample file, and the seeded, disjoint train/eval/test subsets."""

from __future__ import annotations

import csv
import json
import logging
import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from selective_attention.recipes.nli import FIELDS, NLIExample, label_id

if TYPE_CHECKING:
    from selective_attention.recipes.arguments import DataArguments

logger = logging.getLogger(__name__)


def _read_rows(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    if suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number}: not valid JSON: {error}") from None
        return rows
    if suffix == ".json":
        data = json.loads(text)
        if isinstance(data, dict) and "data" in data:
            data = data["data"]
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of examples (or {{'data': [...]}})")
        return data
    if suffix in (".csv", ".tsv"):
        return list(csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ","))
    raise ValueError(f"{path}: unsupported data file type {suffix!r}; use .jsonl, .json, .csv or .tsv")


def examples_from_rows(rows: Iterable[dict], source: str = "data", *, drop_unlabeled: bool = True) -> list[NLIExample]:
    """Validate rows with MNLI's fields; a missing field or an unknown label names the row."""
    examples = []
    for number, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{source}: example {number} is not an object with fields {', '.join(FIELDS)}")
        missing = [name for name in FIELDS if name not in row or row[name] is None]
        if missing:
            raise ValueError(f"{source}: example {number} lacks field(s) {', '.join(missing)} "
                             f"(has {', '.join(sorted(row)) or 'nothing'})")
        if drop_unlabeled and row["label"] in (-1, "-1"):  # MNLI marks examples without gold label with -1
            continue
        label = label_id(row["label"], where=f" in {source} example {number}")
        example_id = row.get("id", row.get("pairID", number))
        examples.append(NLIExample(str(row["premise"]), str(row["hypothesis"]), label, str(example_id)))
    return examples


def load_file(path: str | Path) -> list[NLIExample]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"NLI data file {path} does not exist")
    return examples_from_rows(_read_rows(path), str(path))


def load_hub_split(dataset: str, split: str) -> list[NLIExample]:
    """One split of a hub dataset with MNLI's fields (needs the network or a warm `datasets` cache)."""
    from datasets import load_dataset

    data = load_dataset(dataset, split=split)
    missing = [name for name in FIELDS if name not in data.column_names]
    if missing:
        raise ValueError(f"{dataset}[{split}] lacks field(s) {', '.join(missing)} (has {', '.join(data.column_names)})")
    return examples_from_rows(data.select_columns(list(FIELDS) + (["pairID"] if "pairID" in data.column_names
                                                                   else [])), f"{dataset}[{split}]")


def sample_splits(pools: dict[str, list[NLIExample]], requests: Sequence[tuple[str, str, int | None]],
                  seed: int) -> dict[str, list[NLIExample]]:
    """Seeded subsets: `requests` are (name, pool, size); subsets drawn from one pool never overlap.

    Each pool is shuffled once with `seed` and handed out in request order, so the eval subset stays the same
    when the test subset grows, and eval and test drawn from the same split are disjoint by construction.
    A size of None means the whole rest of the pool, 0 an empty subset.
    """
    orders = {}
    for name, pool, size in requests:
        if pool not in pools:
            raise ValueError(f"split {name!r} asks for pool {pool!r}, which is not loaded ({', '.join(pools)})")
        if pool not in orders:
            order = list(range(len(pools[pool])))
            random.Random(f"{seed}-{pool}").shuffle(order)
            orders[pool] = order
    taken = {pool: 0 for pool in orders}
    out = {}
    for name, pool, size in requests:
        start, available = taken[pool], len(orders[pool]) - taken[pool]
        if size is not None and size < 0:
            raise ValueError(f"{name}_size must be >= 0 (or null for all that is left), got {size}")
        count = available if size is None else size
        if count > available:
            raise ValueError(f"{name} asks for {size} examples from {pool!r} but only {available} are left "
                             f"({len(orders[pool])} in total, {start} already used by earlier splits)")
        out[name] = [pools[pool][i] for i in orders[pool][start:start + count]]
        taken[pool] = start + count
    return out


#: The small NLI file shipped with the package (48 examples written for the tests and the CPU smoke recipe).
SAMPLE_NAME = "sample"


def sample_file() -> Path:
    return Path(__file__).resolve().parents[1] / "data" / "nli_sample.jsonl"


def load_run_splits(data: DataArguments, seed: int) -> dict[str, list[NLIExample]]:
    """train/eval/test subsets for `DataArguments`: local files if given, else `data.dataset`.

    Files: eval defaults to the train file and test to the eval file; subsets drawn from one file are disjoint.
    Hub dataset: pools are its splits (`train_split`, `eval_split`, `test_split`); eval and test drawn from the
    same split are disjoint. `dataset: sample` is the bundled sample file. The train subset is always drawn first,
    so an evaluation-only recipe with the same data settings and seed scores exactly the fine-tuning run's subsets.
    """
    requests: list[tuple[str, str, int | None]] = []
    pools: dict[str, list[NLIExample]] = {}
    if data.train_file or data.eval_file or data.test_file or data.dataset == SAMPLE_NAME:
        default = str(sample_file()) if data.dataset == SAMPLE_NAME else None
        train_file = data.train_file or default
        eval_file = data.eval_file or train_file
        test_file = data.test_file or eval_file
        files = {"train": train_file, "eval": eval_file, "test": test_file}
        for name, path in files.items():
            if path is None:
                raise ValueError(f"data: no file for the {name} split (set {name}_file)")
            if path not in pools:
                pools[path] = load_file(path)
        named = files
    else:
        if not data.dataset:
            raise ValueError("data: set dataset (e.g. nyu-mll/multi_nli) or train_file")
        named = {"train": data.train_split, "eval": data.eval_split, "test": data.test_split}
        for name, split in named.items():
            if split not in pools:
                pools[split] = load_hub_split(data.dataset, split)
    for name in ("train", "eval", "test"):  # always in this order, so every recipe sees the same subsets
        size = getattr(data, f"{name}_size")
        requests.append((name, named[name], size))
    splits = sample_splits(pools, requests, seed)
    for name, examples in splits.items():
        logger.info("%s: %d examples from %s", name, len(examples), named[name])
    return splits

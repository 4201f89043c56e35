"""`evaluate` metric modules shipped with the package (local files: `evaluate.load(path)` works offline)."""

from pathlib import Path

#: Path of the needle-score metric module, for `evaluate.load`.
NEEDLE_ROUGE_PATH = str(Path(__file__).with_name("needle_rouge.py"))

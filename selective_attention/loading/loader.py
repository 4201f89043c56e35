"""Load any causal LM (hub id, local dir, .gguf file, embedded model name) or, by default, the embedded SmolLM2."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from selective_attention.distributed.placement import check_placement, parse_device_map, parse_max_memory
from selective_attention.loading import assets, quantization
from selective_attention.modeling import gguf_dequantize_kwargs

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "auto": "auto"}


@contextmanager
def _quiet_torchao() -> Iterator[None]:
    """While loading only: transformers imports torchao (our CPU int8 backend), which on a CPU-only torch logs a
    "Failed to load ... .so" warning per CUDA kernel library and a pytree deprecation notice per enum. Both are
    harmless here; the loggers are restored afterwards, so users' logging is not changed process-wide."""
    torchao, pytree = logging.getLogger("torchao"), logging.getLogger("torch.utils._pytree")
    level = torchao.level

    def keep(record: logging.LogRecord) -> bool:
        return "natively supported by torch.compile" not in record.getMessage()

    torchao.setLevel(logging.ERROR)
    pytree.addFilter(keep)
    try:
        yield
    finally:
        torchao.setLevel(level)
        pytree.removeFilter(keep)


def resolve_model(model: str | Path | None) -> str:
    """`None` means the embedded default model; an embedded model's name (`smollm2-135m`, `gemma3-270m`) its
    cached checkpoint, fetched and converted on first use."""
    if model is None:
        return str(assets.model_dir())
    if str(model) in assets.EMBEDDED_MODELS:
        return str(assets.model_dir(model=str(model)))
    return str(model)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def load_model(
    model: str | Path | None = None,
    *,
    dtype: str | torch.dtype = "float32",
    attn_implementation: str = "sdpa",
    device: str | None = None,
    trust_remote_code: bool = False,
    quantize: str | None = None,
    device_map: str | dict | None = None,
    max_memory: str | dict | None = None,
    offload_folder: str | Path | None = None,
    **kwargs,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) in eval mode. A path ending in .gguf is dequantized on the fly.

    `quantize`: None, "4bit" / "8bit" (bitsandbytes, CUDA) or "int8" (torchao weight-only, CPU or CUDA); see
    `selective_attention.loading.quantization`. The choice is kept as `model.sa_quantization` for result sidecars.
    `device_map` ("auto", "balanced", ... or {module: device}), `max_memory` ({0: "20GiB", "cpu": "64GiB"}) and
    `offload_folder` go to `from_pretrained` (accelerate's big-model inference; see `selective_attention.distributed.placement`).
    """
    device_map, max_memory = parse_device_map(device_map), parse_max_memory(max_memory)
    check_placement(device, device_map, max_memory, offload_folder)
    name = resolve_model(model)
    load_kwargs = dict(dtype=resolve_dtype(dtype), attn_implementation=attn_implementation,
                       trust_remote_code=trust_remote_code, **kwargs)
    if device_map is not None:
        load_kwargs["device_map"] = device_map
    if max_memory is not None:
        load_kwargs["max_memory"] = max_memory
    if offload_folder is not None:
        load_kwargs["offload_folder"] = str(offload_folder)
    source: str = name
    if name.endswith(".gguf"):
        if quantize:
            raise ValueError(f"--quantize {quantize} cannot be combined with a .gguf file (it is dequantized on "
                             "load); convert it to safetensors first or drop --quantize")
        path = Path(name)
        source = str(path.parent)
        load_kwargs.update(gguf_file=path.name, **gguf_dequantize_kwargs())
    method = None
    if quantize:
        method = quantization.check_available(quantize, device)
        load_kwargs["quantization_config"] = method.build(load_kwargs["dtype"])
        if method.backend == "bitsandbytes":  # bitsandbytes places weights while loading; .to() is not allowed after
            load_kwargs.setdefault("device_map", {"": device or "cuda"})
            device = None
    with _quiet_torchao():
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=load_kwargs.get("gguf_file"),
                                                  trust_remote_code=trust_remote_code)
        loaded = AutoModelForCausalLM.from_pretrained(source, **load_kwargs)
    if device:
        loaded = loaded.to(device)
    loaded.eval()
    if method is not None:
        loaded.sa_quantization = quantization.describe(quantize)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    logger.info("loaded %s (%s, %s%s)", name, loaded.dtype, loaded.config._attn_implementation,
                f", devices {sorted(set(map(str, loaded.hf_device_map.values())))}"
                if getattr(loaded, "hf_device_map", None) else "")
    return loaded, tokenizer

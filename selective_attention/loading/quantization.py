"""Quantized loading (`--quantize`): bitsandbytes 4/8-bit on CUDA as the Retrieval_Head reference offers, and
torchao int8 weight-only, which also runs on CPU.

Head surgery does not care how the projections are stored: the probe and masked attention functions see the same
query/key/value tensors whatever Linear produced them, so detection and masking work unchanged on these models.
The chosen quantization is recorded (see `describe`) so that head-score sidecars say which weights produced them.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

logger = logging.getLogger(__name__)


class MissingBackendError(ImportError):
    """An optional package that the requested feature needs is not installed (the message says how to install it)."""


def package_available(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def package_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass(frozen=True)
class QuantizationMethod:
    """One `--quantize` choice: which package builds it, whether it needs CUDA, and how to make the config."""

    name: str
    backend: str
    package: str  # import name
    distribution: str  # pip name
    bits: int
    needs_cuda: bool
    description: str
    build: Callable[[torch.dtype], Any]

    @property
    def install_hint(self) -> str:
        return f"pip install {self.distribution}"


def _compute_dtype(dtype: torch.dtype | str) -> torch.dtype:
    return dtype if isinstance(dtype, torch.dtype) else torch.bfloat16


def _bnb_4bit(dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=_compute_dtype(dtype))


def _bnb_8bit(dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_8bit=True)


def _torchao_int8(dtype):
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    return TorchAoConfig(Int8WeightOnlyConfig())


QUANTIZATIONS: dict[str, QuantizationMethod] = {
    method.name: method for method in (
        QuantizationMethod("4bit", "bitsandbytes", "bitsandbytes", "bitsandbytes", 4, True,
                           "bitsandbytes NF4 (double quantization), CUDA", _bnb_4bit),
        QuantizationMethod("8bit", "bitsandbytes", "bitsandbytes", "bitsandbytes", 8, True,
                           "bitsandbytes LLM.int8(), CUDA", _bnb_8bit),
        QuantizationMethod("int8", "torchao", "torchao", "torchao", 8, False,
                           "torchao int8 weight-only, CPU or CUDA", _torchao_int8),
    )
}


def get_method(name: str) -> QuantizationMethod:
    if name not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {name!r}; expected one of {', '.join(QUANTIZATIONS)} "
                         "(4bit/8bit: bitsandbytes on CUDA; int8: torchao weight-only, works on CPU)")
    return QUANTIZATIONS[name]


def check_available(name: str, device: str | torch.device | None = None) -> QuantizationMethod:
    """The method for `name`, after checking its package is installed and, for bitsandbytes, that CUDA is usable."""
    method = get_method(name)
    if not package_available(method.package):
        raise MissingBackendError(f"--quantize {name} needs {method.distribution}, which is not installed: "
                                  f"{method.install_hint}")
    on_cpu = (device is not None and torch.device(device).type == "cpu") or not torch.cuda.is_available()
    if method.needs_cuda and on_cpu:
        raise ValueError(f"--quantize {name} uses {method.backend}, which needs a CUDA GPU here; on CPU use "
                         "--quantize int8 (torchao weight-only)")
    return method


def describe(name: str | None) -> dict | None:
    """Sidecar record of a quantization choice (None when the model is not quantized)."""
    if not name:
        return None
    method = get_method(name)
    return {"method": method.name, "backend": method.backend, "bits": method.bits,
            "version": package_version(method.distribution), "description": method.description}


def describe_model(model) -> dict | None:
    """What the loaded model says about its own quantization (ours, or one that came with the checkpoint)."""
    recorded = getattr(model, "sa_quantization", None)
    if recorded is not None:
        return dict(recorded)
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is None:
        return None
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    method = data.get("quant_method")
    return {"method": str(method.value if hasattr(method, "value") else method), "backend": str(method),
            "config": {k: v for k, v in data.items() if isinstance(v, (str, int, float, bool)) or v is None}}


def quantize_model(model, name: str = "int8"):
    """Quantize an already loaded model in place (torchao methods only; bitsandbytes quantizes while loading).

    Handy for models built in memory (tests, converted models); `load_model(quantize=...)` is the usual route.
    """
    method = check_available(name, next(model.parameters()).device)
    if method.backend != "torchao":
        raise ValueError(f"quantize_model supports torchao methods only; load with load_model(quantize={name!r})")
    from torchao.quantization import quantize_

    quantize_(model, method.build(model.dtype).quant_type)
    model.sa_quantization = describe(name)
    return model


def add_quantize_argument(parser) -> None:
    """`--quantize` for a CLI command."""
    parser.add_argument("--quantize", default=None, choices=sorted(QUANTIZATIONS),
                        help="load the model quantized: 4bit/8bit (bitsandbytes, CUDA) or int8 (torchao weight-only, "
                             "CPU or CUDA)")

"""The fused C++ decode step of `rescore` (csrc/rescore_decode.cpp), compiled on first use.

`torch.utils.cpp_extension.load` builds it once per machine (about a minute; cached under
`TORCH_EXTENSIONS_DIR`, default ~/.cache/torch_extensions) for the host CPU (`-O3 -march=native`). Without a C++
compiler, or with SELECTIVE_ATTENTION_NATIVE=0, `rescore_kernel()` returns None and the PyTorch path runs (same
terms, slower: it materialises the candidate keys and the per-head selections as tensors).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path
from types import ModuleType

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "rescore_decode.cpp"
HEADERS = (Path(__file__).parent / "csrc" / "selection.h",)
ENV_SWITCH = "SELECTIVE_ATTENTION_NATIVE"


@functools.cache
def _build() -> ModuleType | None:
    try:
        from torch.utils.cpp_extension import load

        logger.info("building the fused rescore decode kernel (once per machine)")
        # the build cache is keyed by the name: hashing the sources and headers into it rebuilds after any change
        digest = hashlib.sha256(b"".join(path.read_bytes() for path in (SOURCE, *HEADERS))).hexdigest()[:12]
        return load(name=f"sa_rescore_decode_{digest}", sources=[str(SOURCE)], verbose=False,
                    extra_cflags=["-O3", "-march=native", "-fopenmp-simd", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math"])
    except Exception as error:  # noqa: BLE001 - no compiler, no ninja, another platform: the PyTorch path still works
        logger.warning("fused rescore decode kernel unavailable (%s); using the PyTorch path", error)
        return None


def rescore_kernel() -> ModuleType | None:
    """The compiled module (with `rescore_decode`), or None when disabled or unavailable."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    return _build()

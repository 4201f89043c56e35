"""What every GPU-suite section shares: the run settings, random-weight models at real shapes, timing, memory.

Timing: CUDA events around each call (host clock on CPU), a warm-up call, then the median of `repeats`. Every ratio
is taken against a baseline timed in the same run on the same device. Peak memory is CUDA's max allocated, reset
before each measured call; on CPU it is not measured (None).
"""

from __future__ import annotations

import logging
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Iterator

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from selective_attention.modeling import cache_kwargs

logger = logging.getLogger("gpu_suite")

#: Llama-3.1-8B: 32 layers, 32 query / 8 KV heads of 128 dims, 128K context with llama3 RoPE scaling.
LLAMA_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
                rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001,
                rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
#: A small model with the same head dim (flash-attn and GQA paths alike) for the quick checks.
SMALL = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=4, num_attention_heads=16,
             num_key_value_heads=4, head_dim=128, max_position_embeddings=32768)
#: --tiny stand-ins: same structure (GQA, llama3 RoPE), toy sizes, so every code path still runs.
TINY_BIG = dict(LLAMA_8B, vocab_size=512, bos_token_id=1, eos_token_id=2, hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                max_position_embeddings=1024,
                rope_parameters=dict(LLAMA_8B["rope_parameters"], original_max_position_embeddings=128))
TINY_SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=1024)

CONTEXTS = {"8K": 8192, "32K": 32768, "128K": 131072}
TINY_CONTEXTS = {"8K": 64, "32K": 128, "128K": 256}


class Skip(Exception):
    """Raised by a section (or a row of one) that cannot run here; the message is the reason."""


@dataclass
class Suite:
    """Settings shared by the sections, and the big model built once and handed from section to section."""

    device: torch.device
    tiny: bool
    dtype: torch.dtype = torch.bfloat16
    repeats: int = 3
    new_tokens: int = 32
    model_path: str | None = None
    contexts: dict[str, int] = field(default_factory=lambda: dict(CONTEXTS))
    _big: torch.nn.Module | None = field(default=None, repr=False)

    @classmethod
    def create(cls, device: str, tiny: bool, model_path: str | None = None) -> "Suite":
        if tiny:
            return cls(torch.device(device), True, repeats=2, new_tokens=4, model_path=model_path,
                       contexts=dict(TINY_CONTEXTS))
        return cls(torch.device(device), False, model_path=model_path)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def big_config(self) -> LlamaConfig:
        return LlamaConfig(**(TINY_BIG if self.tiny else LLAMA_8B))

    def small_config(self, **overrides) -> LlamaConfig:
        return LlamaConfig(**{**(TINY_SMALL if self.tiny else SMALL), **overrides})

    def big_model(self) -> torch.nn.Module:
        """The Llama-3.1-8B-shaped random model in `dtype` (built on first use, kept until `release_big`)."""
        if self._big is None:
            start = time.perf_counter()
            self._big = random_model(self.big_config(), self.device, self.dtype)
            logger.info("built the %s model in %.1f s", "tiny" if self.tiny else "8B-shaped",
                        time.perf_counter() - start)
        self._big.set_attn_implementation("sdpa")
        return self._big

    def release_big(self) -> None:
        self._big = None
        self.empty_cache()

    def empty_cache(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    def shapes(self) -> dict:
        big, small = self.big_config(), self.small_config()
        describe = lambda c: dict(layers=c.num_hidden_layers, heads=c.num_attention_heads,  # noqa: E731
                                  kv_heads=c.num_key_value_heads, head_dim=c.head_dim, hidden=c.hidden_size,
                                  vocab=c.vocab_size)
        return dict(big=describe(big), small=describe(small), contexts=self.contexts, new_tokens=self.new_tokens,
                    repeats=self.repeats)


def random_model(config: LlamaConfig, device: torch.device, dtype: torch.dtype, seed: int = 0,
                 attn_implementation: str = "sdpa") -> torch.nn.Module:
    """A causal LM from `config` with N(0, initializer_range) matrices and unit norms, built straight on `device`.

    Built on the meta device first, so an 8B model never exists on the host and no time goes to CPU init.
    """
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 1:
                parameter.fill_(1.0)  # RMSNorm weights
            else:
                parameter.normal_(0.0, config.initializer_range, generator=generator)
    # to_empty left the RoPE buffers uninitialised: rebuild the rotary module for real
    rotary = model.model.rotary_emb
    with torch.device(device):
        model.model.rotary_emb = type(rotary)(config=model.config)
    return model.eval()


def random_ids(vocab: int, length: int, device: torch.device, seed: int = 0, batch: int = 1) -> torch.Tensor:
    """(batch, length) token ids, avoiding id 0-9 (special tokens of some vocabularies)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab, (batch, length), generator=generator).to(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """(milliseconds, result) of one call of `fn` (CUDA events on a GPU, the host clock elsewhere)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end), result
    begin = time.perf_counter()
    result = fn()
    return (time.perf_counter() - begin) * 1e3, result


def median_ms(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    synchronize(device)
    return statistics.median(timed(fn, device)[0] for _ in range(repeats))


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict]:
    """Yields a dict filled on exit with `peak_mib` (max allocated) and `extra_mib` (above what was allocated
    before: activations, cache, attention weights); None on CPU."""
    out: dict = {"peak_mib": None, "extra_mib": None}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    try:
        yield out
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device)
            out.update(peak_mib=round(peak / 2**20, 1), extra_mib=round((peak - before) / 2**20, 1))


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def check(name: str, passed: bool, **details) -> dict:
    """One correctness check of a section: the suite fails when any check fails."""
    return dict(name=name, passed=bool(passed), **details)


def decode_ms(model, cache, logits: torch.Tensor, steps: int, device: torch.device) -> list[float]:
    """Greedy decode `steps` tokens from the last `logits` (batch, 1, vocab) into `cache`; ms of each step."""
    times = []
    token = logits[:, -1:].argmax(-1)  # (batch, 1)
    with torch.inference_mode():
        for _ in range(steps):
            ms, out = timed(partial(model, input_ids=token, **cache_kwargs(cache), use_cache=True, logits_to_keep=1),
                            device)
            times.append(ms)
            token = out.logits[:, -1:].argmax(-1)
    return times

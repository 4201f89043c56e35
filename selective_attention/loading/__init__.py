"""Getting a model: the one loader (`load_model`: hub id, local dir, .gguf file or embedded model name), the
embedded offline assets (`assets`) and quantized loading (`quantization`)."""

from selective_attention.loading.loader import load_model, resolve_dtype, resolve_model

__all__ = ["load_model", "resolve_dtype", "resolve_model"]

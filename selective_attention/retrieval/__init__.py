"""Needle-in-a-haystack: haystacks and needles, retrieval-head detection, and the NIAH grid with head masks."""

from selective_attention.retrieval.corpus import load_haystack_text
from selective_attention.retrieval.detect import DetectConfig, DetectResult, detect, retrieval_scores
from selective_attention.retrieval.evaluate import NeedleConfig, load_results, resolve_mask, run_needle_grid
from selective_attention.retrieval.haystack import Haystack, NeedlePrompt, build_prompt, prompt_template
from selective_attention.retrieval.needles import Needle, builtin_needles, load_needles, resolve_needles

__all__ = [
    "DetectConfig", "DetectResult", "Haystack", "Needle", "NeedleConfig", "NeedlePrompt", "build_prompt",
    "builtin_needles", "detect", "load_haystack_text", "load_needles", "load_results", "prompt_template",
    "resolve_mask", "resolve_needles", "retrieval_scores", "run_needle_grid",
]

"""Sections of benchmarks/gpu_suite.py, one module each; `SECTIONS` is the order they run in."""

from . import detection, equivalence, gqa, headwise, prefill, tree

#: (name, module with `run(suite) -> {"rows", "checks", "notes"}`)
SECTIONS = (
    ("1 masked attention == plain kernels", equivalence),
    ("2 masked-head prefill overhead", prefill),
    ("3 probe vs reference detection", detection),
    ("4 head-wise KV cache", headwise),
    ("5 tree-kernel decode attention", tree),
    ("6 converted GQA decode", gqa),
)

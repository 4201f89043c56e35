"""Tree-kernel sparse attention (`sa_tree_kernel`): select the keys that matter with summaries of key blocks.

    from selective_attention.tree_kernel import TreeKernelConfig, configure_tree_kernel
    configure_tree_kernel(model, TreeKernelConfig(method="bound", budget=512, layers=range(2, 30)))

Modules: `config` (methods, budget rule, cost counters), `key_tree` (incremental tree of key summaries),
`feature_maps`, `ops`, one module per selector (`topk`, `bound`, `bound_tree`, `sampled`), `attention` (the
registered function and `configure_tree_kernel`).
"""

from selective_attention.tree_kernel.attention import NAME, configure_tree_kernel, tree_attention, tree_kernel_attention
from selective_attention.tree_kernel.config import METHODS, SAMPLED_METHODS, TreeKernelConfig, TreeStats

__all__ = ["METHODS", "NAME", "SAMPLED_METHODS", "TreeKernelConfig", "TreeStats", "configure_tree_kernel",
           "tree_attention", "tree_kernel_attention"]

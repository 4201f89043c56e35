"""Key trees over the KV cache used by the tree-kernel attention."""

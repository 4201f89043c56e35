"""Attention functions with the transformers 5 `AttentionInterface` signature."""

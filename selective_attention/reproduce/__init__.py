"""`selective-attention reproduce`: the seeds' experiments end to end on one model, into one folder.

`config` (the steps and `ReproduceConfig`), `pipeline` (one function per step, `reproduce`), `report` (`index.md`,
docs/results.md).
"""

from selective_attention.reproduce.config import STEPS, ReproduceConfig, load_reproduce_config
from selective_attention.reproduce.pipeline import reproduce
from selective_attention.reproduce.report import render_report, write_results_doc

__all__ = ["STEPS", "ReproduceConfig", "load_reproduce_config", "render_report", "reproduce", "write_results_doc"]

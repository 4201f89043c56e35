"""The retrieval experiments in one YAML-driven run: detect retrieval heads -> needle grid per mask -> plots.

Reuses `selective_attention.needle` (detection, NIAH grid with head masks) and `selective_attention.plots`.
Every stage resumes: detection keeps finished trials in head_scores.json, the needle grid keeps finished points,
so re-running the same config picks up where it stopped. A different config in the same directory is refused
unless --overwrite.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import to_dict
from .io import RUN_MARKER, prepare_output_dir, write_json, write_text

logger = logging.getLogger(__name__)


@dataclass
class GridSection:
    lengths: list[int] = field(default_factory=lambda: [500, 1000])
    depths: list[float] = field(default_factory=lambda: [10.0, 50.0, 90.0])
    max_new_tokens: int = 32


@dataclass
class NeedleRecipeConfig:
    output_dir: str
    model: str | None = None  #: HF id, local dir (converted checkpoints work) or null for the embedded SmolLM2
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    needles: str = "sf"  #: built-in names ("sf", "all") or a .jsonl file
    haystack: str | None = None  #: folder of .txt files; null = the embedded Paul Graham essays
    detect: GridSection = field(default_factory=GridSection)
    detect_method: str = "probe"  #: probe (fast, during decoding) | reference (Retrieval_Head's way)
    rouge_threshold: float = 0.5
    head_scores: str | None = None  #: reuse an existing head-score file instead of detecting
    needle: GridSection = field(default_factory=GridSection)
    masks: list[str | None] = field(default_factory=lambda: [None, "top:10", "random:10"])
    mask_mode: str = "zero"
    seed: int = 0
    plot_top: int = 20


def _label(mask: str | None) -> str:
    return "no_mask" if not mask else re.sub(r"[^A-Za-z0-9_.-]+", "_", mask)


def _prepare(config: NeedleRecipeConfig, overwrite: bool) -> Path:
    """Resume a run of the same config; refuse another config unless `overwrite`."""
    output_dir = Path(config.output_dir)
    marker = output_dir / RUN_MARKER
    if marker.exists() and not overwrite:
        previous = json.loads(marker.read_text(encoding="utf-8"))
        if previous != json.loads(json.dumps(to_dict(config))):
            raise ValueError(f"{output_dir} holds a run with another config; pass --overwrite to replace it "
                             "(or use another output_dir)")
        logger.info("resuming %s", output_dir)
        return output_dir
    prepare_output_dir(output_dir, overwrite)
    write_json(marker, to_dict(config))
    return output_dir


def run_needle_recipe(config: NeedleRecipeConfig, *, overwrite: bool = False, progress: bool = True) -> dict:
    """Detect (unless `head_scores` is given), run the needle grid for every mask, plot; returns the summary."""
    from .. import assets, plots
    from ..heads import load_head_scores
    from ..loading import load_model
    from ..masking import text_config
    from ..needle import DetectConfig, NeedleConfig, detect, resolve_needles, run_needle_grid

    started = time.perf_counter()
    output_dir = _prepare(config, overwrite)
    needles = resolve_needles(config.needles)
    model, tokenizer = load_model(config.model, dtype=config.dtype, attn_implementation=config.attn_implementation)
    model_name = config.model or assets.MODEL_NAME
    text = text_config(model)

    scores_path = Path(config.head_scores) if config.head_scores else output_dir / "head_scores.json"
    if config.head_scores is None:
        detect_config = DetectConfig(lengths=config.detect.lengths, depths=config.detect.depths, needles=needles,
                                     method=config.detect_method, max_new_tokens=config.detect.max_new_tokens,
                                     rouge_threshold=config.rouge_threshold, haystack=config.haystack)
        result = detect(model, tokenizer, detect_config, scores_path, model_name=model_name, progress=progress)
        logger.info("detection: %d new trials in %.1fs", result.new_trials, result.seconds)
    scores = load_head_scores(scores_path)
    plots.plot_head_scores(scores, output_dir / "head_scores.png", title=f"{Path(model_name).name} retrieval score",
                           num_layers=text.num_hidden_layers, num_heads=text.num_attention_heads)
    if any(values for values in scores.values()):
        plots.plot_top_heads(scores, output_dir / "top_heads.png", k=config.plot_top)

    runs = []
    summary_rows = []
    for mask in config.masks:
        label = _label(mask)
        needle_config = NeedleConfig(lengths=config.needle.lengths, depths=config.needle.depths, needles=needles,
                                     mask=mask, seed=config.seed, mask_mode=config.mask_mode,
                                     head_scores=str(scores_path) if mask else None,
                                     max_new_tokens=config.needle.max_new_tokens, haystack=config.haystack)
        results = run_needle_grid(model, tokenizer, needle_config, output_dir / "needle" / label,
                                  model_name=model_name, progress=progress)
        mean = sum(r["score"] for r in results) / len(results) if results else float("nan")
        runs.append((mask or "no mask", results))
        summary_rows.append({"mask": mask, "label": label, "points": len(results), "mean_score": round(mean, 2),
                             "masked_heads": results[0]["masked_heads"] if results else []})
        logger.info("needle %s: mean score %.1f over %d points", mask or "no mask", mean, len(results))
    plots.plot_niah(runs, output_dir / "niah.png", title=f"{Path(model_name).name}, mask mode {config.mask_mode}")

    summary = {"model": model_name, "head_scores": str(scores_path), "mask_mode": config.mask_mode,
               "runs": summary_rows, "seconds": round(time.perf_counter() - started, 1)}
    write_json(output_dir / "summary.json", summary)
    lines = ["# Needle in a haystack with masked heads", "",
             f"Model `{model_name}`, mask mode `{config.mask_mode}`, lengths {config.needle.lengths}, depths "
             f"{config.needle.depths}; head scores `{scores_path}`.", "",
             "| mask | points | mean score (ROUGE-1 recall x 100) |", "|---|---:|---:|"]
    lines += [f"| {row['mask'] or 'none'} | {row['points']} | {row['mean_score']:.1f} |" for row in summary_rows]
    write_text(output_dir / "summary.md", "\n".join(lines) + "\n")
    return summary

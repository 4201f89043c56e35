"""The retrieval experiments in one YAML-driven run: detect retrieval heads -> needle grid per mask -> plots.

Reuses `selective_attention.retrieval` (detection, NIAH grid with head masks) and `selective_attention.plots`.
Every stage resumes: detection keeps finished trials in head_scores.json, the needle grid keeps finished points,
so re-running the same config picks up where it stopped. A different config in the same directory is refused
unless --overwrite. Language, chat and scoring options have the names of the `needle` command's flags.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from selective_attention import plots
from selective_attention.heads.scores import load_head_scores
from selective_attention.loading import assets
from selective_attention.loading.loader import DTYPES, load_model
from selective_attention.modeling import text_config
from selective_attention.recipes.io import RUN_MARKER, prepare_output_dir, write_json, write_text
from selective_attention.recipes.parsing import CheckedArguments, borrowed_field, settings
from selective_attention.retrieval import DetectConfig, NeedleConfig, detect, run_needle_grid
from selective_attention.retrieval.languages import get_language

logger = logging.getLogger(__name__)

#: Entries of `masks` that mean "no mask" (YAML null, or this word on the command line).
NO_MASK = (None, "", "none")


@dataclass
class NeedleRecipeArguments(CheckedArguments):
    """Detection grid, needle grid and the masks to compare; one model, one output directory."""

    output_dir: str = field(metadata={"help": "run directory (resumed when the config is the same)"})
    model: str | None = field(default=None, metadata={
        "help": "HF id or local dir (converted checkpoints work); unset = the embedded SmolLM2"})
    dtype: str = field(default="float32", metadata={"help": "weights dtype", "choices": tuple(DTYPES)})
    attn_implementation: str = field(default="sdpa", metadata={"help": "base attention implementation"})
    needles: str | None = borrowed_field(DetectConfig, "needles", default=None)
    haystack: str | None = borrowed_field(DetectConfig, "haystack")
    language: str = borrowed_field(DetectConfig, "language")
    haystack_language: str | None = borrowed_field(DetectConfig, "haystack_language")
    chat: bool = field(default=True, metadata={
        "help": "chat template when the tokenizer has one; --no-chat: plain prompt"})
    score_against: str = borrowed_field(NeedleConfig, "score_against")
    detect_lengths: list[int] = field(default_factory=lambda: [500, 1000], metadata={
        "help": "detection context lengths (tokens)"})
    detect_depths: list[float] = field(default_factory=lambda: [10.0, 50.0, 90.0], metadata={
        "help": "detection needle depths (percent)"})
    detect_max_new_tokens: int = field(default=32, metadata={"help": "answer length during detection"})
    detect_method: str = borrowed_field(DetectConfig, "method")
    rouge_threshold: float = borrowed_field(DetectConfig, "rouge_threshold")
    head_scores: str | None = field(default=None, metadata={
        "help": "reuse this head-score file instead of detecting"})
    lengths: list[int] = field(default_factory=lambda: [500, 1000], metadata={
        "help": "needle-grid context lengths (tokens)"})
    depths: list[float] = field(default_factory=lambda: [10.0, 50.0, 90.0], metadata={
        "help": "needle-grid depths (percent)"})
    max_new_tokens: int = field(default=32, metadata={"help": "answer length in the needle grid"})
    masks: list[str] = field(default_factory=lambda: ["none", "top:10", "random:10"], metadata={
        "help": "one needle grid per entry: none, top:K, bottom:K, random:K or 'L-H,L-H'"})
    mask_mode: str = borrowed_field(NeedleConfig, "mask_mode")
    seed: int = borrowed_field(NeedleConfig, "seed")
    plot_top: int = field(default=20, metadata={"help": "heads in top_heads.png"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.masks = [None if mask in NO_MASK else mask for mask in self.masks]
        for code in (self.language, self.haystack_language):
            if code is not None:
                get_language(code)  # an unknown language fails here, before the model loads

    def grid_options(self) -> dict:
        """What detection and the needle grid share: needles, haystack, languages, prompt style."""
        return dict(needles=get_language(self.language).resolve_needles(self.needles), haystack=self.haystack,
                    chat=None if self.chat else False, language=self.language,
                    haystack_language=self.haystack_language)


NEEDLE_ARGUMENTS: tuple[type, ...] = (NeedleRecipeArguments,)


def _label(mask: str | None) -> str:
    return "no_mask" if not mask else re.sub(r"[^A-Za-z0-9_.-]+", "_", mask)


def _prepare(config: NeedleRecipeArguments, overwrite: bool) -> Path:
    """Resume a run of the same config; refuse another config unless `overwrite`."""
    output_dir = Path(config.output_dir)
    marker = output_dir / RUN_MARKER
    if marker.exists() and not overwrite:
        previous = json.loads(marker.read_text(encoding="utf-8"))
        if previous != json.loads(json.dumps(settings(config))):
            raise ValueError(f"{output_dir} holds a run with another config; pass --overwrite to replace it "
                             "(or use another output_dir)")
        logger.info("resuming %s", output_dir)
        return output_dir
    prepare_output_dir(output_dir, overwrite)
    write_json(marker, settings(config))
    return output_dir


def run_needle_recipe(config: NeedleRecipeArguments, *, overwrite: bool = False, progress: bool = True) -> dict:
    """Detect (unless `head_scores` is given), run the needle grid for every mask, plot; returns the summary."""
    started = time.perf_counter()
    output_dir = _prepare(config, overwrite)
    shared = config.grid_options()
    model, tokenizer = load_model(config.model, dtype=config.dtype, attn_implementation=config.attn_implementation)
    model_name = config.model or assets.MODEL_NAME
    text = text_config(model)

    scores_path = Path(config.head_scores) if config.head_scores else output_dir / "head_scores.json"
    if config.head_scores is None:
        detect_config = DetectConfig(lengths=config.detect_lengths, depths=config.detect_depths,
                                     method=config.detect_method, max_new_tokens=config.detect_max_new_tokens,
                                     rouge_threshold=config.rouge_threshold, **shared)
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
        needle_config = NeedleConfig(lengths=config.lengths, depths=config.depths, mask=mask, seed=config.seed,
                                     mask_mode=config.mask_mode, head_scores=str(scores_path) if mask else None,
                                     max_new_tokens=config.max_new_tokens, score_against=config.score_against,
                                     **shared)
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
             f"Model `{model_name}`, mask mode `{config.mask_mode}`, lengths {config.lengths}, depths "
             f"{config.depths}; head scores `{scores_path}`.", "",
             "| mask | points | mean score (ROUGE-1 recall x 100) |", "|---|---:|---:|"]
    lines += [f"| {row['mask'] or 'none'} | {row['points']} | {row['mean_score']:.1f} |" for row in summary_rows]
    write_text(output_dir / "summary.md", "\n".join(lines) + "\n")
    return summary
